"""The bench's helpers: percentiles, the spread of repeated runs, the underrun rule, how a
run's turns are matched and summarised, and the gRPC round-trip probe."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.stats import Playback, SessionStats, percentile, spread, summarise


def test_percentile_matches_numpy_linear():
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None
    assert percentile([4.0], 99) == 4.0


def test_spread_is_median_min_max_and_skips_missing():
    assert spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": 3}
    assert spread([None])["runs"] == 0


def test_playback_on_time_audio_has_no_underrun():
    playback = Playback(jitter_s=0.02)
    # 0.25 s sent at once, then 40 ms chunks exactly at real time after that
    for _ in range(6):
        playback.chunk(0.0, 0.04)
    for k in range(10):
        playback.chunk(0.24 + 0.04 * k, 0.04)
    assert playback.underruns == 0


def test_playback_counts_a_stall_once_beyond_the_jitter_allowance():
    playback = Playback(jitter_s=0.02)
    playback.chunk(0.0, 0.04)
    playback.chunk(0.05, 0.04)  # 10 ms late: within the allowance, not an underrun
    assert playback.underruns == 0
    playback.chunk(0.20, 0.04)  # played until 0.09: a 110 ms gap
    assert playback.underruns == 1
    assert playback.worst_gap_s == pytest.approx(0.11)
    playback.chunk(0.24, 0.04)  # on time again relative to the restart
    assert playback.underruns == 1


def test_summarise_matches_bursts_to_turns_and_subtracts_the_fakes():
    session = SessionStats(jitter_s=0.02)
    session.speech_ends = [10.0, 14.0, 18.0]
    session.audio(1, 10.5, 0.04)
    session.audio(2, 14.6, 0.04)  # the third burst got no reply: a missed turn
    result = summarise([session], fakes_total_ms=490.0, measure_from=9.0, measure_to=19.0, cpu=1.0, wall=10.0, lags=[0.1])
    assert result["turns"] == 2
    assert result["missed_turns"] == 1
    assert result["added_samples"] == pytest.approx([10.0, 110.0])
    assert result["client_cpu_cores"] == pytest.approx(0.1)


def test_a_session_that_failed_counts_as_an_error_not_as_missed_turns():
    session = SessionStats(jitter_s=0.02)
    session.speech_ends = [10.0, 14.0]
    session.audio(1, 10.5, 0.04)
    session.error = "stt service: boom"
    result = summarise([session], 490.0, 0.0, 100.0, 0.0, 1.0, [])
    assert (result["missed_turns"], result["error_count"]) == (0, 1)


def test_round_trip_probe_echoes_over_loopback(tmp_path):
    from support import Processes, free_port
    from voicemesh.cli.mesh import wait_for_port

    procs = Processes(tmp_path)
    try:
        port = free_port()
        server = procs.start("rtt-echo", [sys.executable, "-m", "bench.rtt", "serve", "--port", str(port)])
        wait_for_port(port, server)
        out = subprocess.run([sys.executable, "-m", "bench.rtt", "ping", "--addr", f"127.0.0.1:{port}", "--count", "20"],
                             capture_output=True, text=True, timeout=60, check=True, cwd=Path(__file__).parents[1])
        result = json.loads(out.stdout)
        assert result["count"] == 20 and 0 < result["p50_us"] <= result["p90_us"]
    finally:
        procs.stop_all()


# --- the contention stage's pure parts (bench/contention.py) ---------------------------------

def test_parse_stat_handles_a_command_name_with_spaces_and_parentheses():
    from bench.contention import CLK_TCK, parse_stat

    # fields 14-17 (utime, stime, cutime, cstime) = 250, 50, 10, 5 ticks; field 20 (num_threads) = 7
    text = "1234 (python (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 10 5 20 0 7 0 555 1000 200 " + "0 " * 30
    stat = parse_stat(text)
    assert stat["state"] == "S" and stat["threads"] == 7
    assert stat["utime_s"] == pytest.approx(250 / CLK_TCK) and stat["stime_s"] == pytest.approx(50 / CLK_TCK)
    assert stat["children_s"] == pytest.approx(15 / CLK_TCK)
    assert stat["cpu_s"] == pytest.approx(315 / CLK_TCK)
    with pytest.raises(ValueError):
        parse_stat("garbage")


def test_parse_stat_reads_this_process():
    import os

    from bench.contention import cpu_seconds, parse_stat

    stat = parse_stat(Path(f"/proc/{os.getpid()}/stat").read_text())
    assert stat["threads"] >= 1 and stat["cpu_s"] > 0
    assert cpu_seconds(2**22 + 12345) is None  # no such process


def test_parse_status_gives_peak_and_current_rss_in_mib_and_threads():
    from bench.contention import parse_status

    text = "Name:\tpython\nVmPeak:\t 900000 kB\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t12\n"
    assert parse_status(text) == {"peak_rss_mib": 200.0, "rss_mib": 100.0, "threads": 12}
    assert parse_status("Name:\tx\n") == {"peak_rss_mib": None, "rss_mib": None, "threads": None}


def test_per_turn_usage_subtracts_the_idle_baseline_and_divides_by_answered_turns():
    from bench.contention import per_turn_usage

    usage = per_turn_usage({"stt": 3.0, "vad": 0.05}, wall_s=20.0, idle_cores={"stt": 0.01, "vad": 0.01},
                           turns=5, session_s=10.0)
    assert usage["stt"]["cpu_s_net"] == pytest.approx(2.8)
    assert usage["stt"]["cpu_s_per_turn"] == pytest.approx(0.56)
    assert usage["stt"]["mean_cores_while_open"] == pytest.approx(0.28)
    assert usage["vad"]["cpu_s_net"] == 0.0  # never below zero
    assert per_turn_usage({"stt": 1.0}, 1.0, {}, turns=0, session_s=0.0)["stt"]["cpu_s_per_turn"] is None


def test_contention_summary_ratios_and_turns_under_contention():
    from bench.contention import headline, summarise_condition

    quiet = summarise_condition({"p50": 800.0, "p90": 900.0, "turns_spoken": 5, "turns_answered": 5}, 800.0)
    quiet["other_processes_cores_median"] = 0.1
    busy = summarise_condition({"p50": 1500.0, "p90": 2000.0, "turns_spoken": 5, "turns_answered": 4}, 800.0)
    limited = summarise_condition({"p50": None, "turns_spoken": 5, "turns_answered": 0}, 800.0)
    assert (quiet["ratio_to_quiet_p50"], busy["ratio_to_quiet_p50"], limited["ratio_to_quiet_p50"]) == (1.0, 1.88, None)
    top = headline({"quiet": quiet, "busy": busy, "limited": limited})
    assert top["busy_to_quiet_p50"] == 1.88 and top["limited_to_quiet_p50"] is None
    assert (top["turns_answered_under_contention"], top["turns_spoken_under_contention"]) == (4, 10)
    assert top["quiet_was_quiet"] is True
    assert summarise_condition({"p50": 900.0}, None)["ratio_to_quiet_p50"] is None
    quiet["other_processes_cores_median"] = 0.9
    assert headline({"quiet": quiet, "busy": busy})["quiet_was_quiet"] is False


def test_contention_targets_pass_fail_and_absent():
    from bench.run import targets

    def results(ratio, answered):
        conditions = {"busy": {"turns_answered": answered, "turns_spoken": 5},
                      "limited": {"turns_answered": 5, "turns_spoken": 5}}
        return {"contention": {"busy_to_quiet_p50": ratio, "conditions": conditions,
                               "turns_spoken_under_contention": 10, "turns_answered_under_contention": 5 + answered}}

    rows = {m: (v, p) for m, _, v, p in targets(results(1.6, 5))}
    assert rows["voice-to-voice p50, one of two cores busy / quiet (same run)"] == (1.6, True)
    assert rows["spoken turns answered under contention"] == ("10/10 (busy 5/5, limited 5/5)", True)
    rows = {m: (v, p) for m, _, v, p in targets(results(2.4, 4))}
    assert rows["voice-to-voice p50, one of two cores busy / quiet (same run)"][1] is False
    assert rows["spoken turns answered under contention"][1] is False
    assert not any("contention" in m for m, *_ in targets({}))
    noisy = results(1.6, 5)
    noisy["contention"]["quiet_was_quiet"] = False
    noisy["contention"]["conditions"]["quiet"] = {"other_processes_cores_median": 0.9}
    value, verdict = {m: (v, p) for m, _, v, p in targets(noisy)}["voice-to-voice p50, one of two cores busy / quiet (same run)"]
    assert verdict is None and "not quiet" in value


def test_find_cpu_cgroup_prefers_v2_with_cpu_and_falls_back_to_v1(tmp_path):
    from bench.contention import find_cpu_cgroup, parse_cpu_stat, quota_line

    v2 = tmp_path / "v2"
    (v2 / "app").mkdir(parents=True)
    (v2 / "app" / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    mounts_v2 = f"cgroup2 {v2} cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
    assert find_cpu_cgroup(mounts_v2, "0::/app\n") == ("v2", v2 / "app")
    # hybrid: the unified tree has no controllers, the cpu controller is on a v1 hierarchy
    hybrid = tmp_path / "hybrid"
    (hybrid / "unified").mkdir(parents=True)
    (hybrid / "unified" / "cgroup.controllers").write_text("\n")
    mounts = (f"cgroup {hybrid}/cpuacct cgroup rw,relatime,cpuacct 0 0\n"
              f"cgroup {hybrid}/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0\n"
              f"cgroup2 {hybrid}/unified cgroup2 rw,relatime 0 0\n")
    own = "3:cpuset:/\n2:cpu,cpuacct:/bench\n0::/\n"
    assert find_cpu_cgroup(mounts, own) == ("v1", hybrid / "cpu,cpuacct" / "bench")
    assert find_cpu_cgroup("proc /proc proc rw 0 0\n", own) is None
    assert quota_line(1.0, "v2") == {"cpu.max": "100000 100000"}
    assert quota_line(1.5, "v1") == {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "150000"}
    assert parse_cpu_stat("nr_periods 22\nnr_throttled 20\nthrottled_time 991932739\n") == {
        "periods": 22, "throttled_periods": 20, "throttled_s": 0.992}
    assert parse_cpu_stat("usage_usec 5\nnr_periods 4\nnr_throttled 1\nthrottled_usec 250000\n")["throttled_s"] == 0.25


def test_machine_busy_time_and_the_load_of_other_processes():
    from bench.contention import CLK_TCK, background_cores, parse_proc_stat

    text = "cpu  100 20 30 5000 40 5 6 7 50 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n"
    assert parse_proc_stat(text) == pytest.approx((100 + 20 + 30 + 5 + 6 + 7) / CLK_TCK)  # not idle, iowait, guest
    with pytest.raises(ValueError):
        parse_proc_stat("intr 1 2 3\n")
    assert background_cores(machine_s=3.0, ours_s=1.0, wall_s=4.0) == 0.5
    assert background_cores(1.0, 1.2, 4.0) == 0.0  # tick rounding never goes negative
    assert background_cores(1.0, 0.0, 0.0) is None


def test_machine_cpu_reads_each_kind_and_steal_is_per_wall_second():
    from bench.stats import CLOCK_TICKS, machine_cpu, steal_cores

    cpu = machine_cpu("cpu  100 20 30 5000 40 5 6 7 50 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n")
    assert cpu["steal"] == pytest.approx(7 / CLOCK_TICKS) and cpu["idle"] == pytest.approx(5000 / CLOCK_TICKS)
    with pytest.raises(ValueError):
        machine_cpu("cpu  1 2 3\n")  # too short to hold steal
    assert steal_cores(10.0, 13.0, 20.0) == 0.15
    assert steal_cores(10.0, 9.99, 20.0) == 0.0  # tick rounding never goes negative
    assert steal_cores(None, 13.0, 20.0) is None and steal_cores(10.0, 13.0, 0.0) is None


def test_summarise_runs_takes_the_median_latency_and_the_worst_steal():
    from bench.stats import summarise_runs

    def run(p50, steal):
        return {"added_ms": {"p50": p50, "p99": p50 * 2}, "server_cpu_cores": 0.5, "turns": 10, "underruns": 0,
                "missed_turns": 0, "error_count": 0, "errors": [], "steal_cores": steal}

    summary = summarise_runs([run(4.0, 0.02), run(6.0, None), run(5.0, 0.3)])
    assert (summary["p50"], summary["p99"], summary["turns"], summary["steal_cores"]) == (5.0, 10.0, 30, 0.3)
    assert summarise_runs([run(4.0, None)])["steal_cores"] is None  # a machine whose /proc/stat says nothing


# -- voice-to-voice comparison (bench/v2v_stats.py) ---------------------------------------

from bench.v2v_stats import (  # noqa: E402 - grouped with the tests that use them
    add_noise, answered_right, edit_distance, pair_ratios, summarise_side, word_error_rate, words,
)


def test_words_ignore_case_and_punctuation():
    assert words("What is the capital of France?") == ["what", "is", "the", "capital", "of", "france"]
    assert words("  It\u2019s PARIS.  ") == ["it's", "paris"]
    assert words("") == []


def test_edit_distance_counts_substitutions_deletions_and_insertions():
    ref = "what is the capital of france".split()
    assert edit_distance(ref, ref) == 0
    assert edit_distance(ref, "what is the capital and friends".split()) == 2  # two substitutions
    assert edit_distance(ref, "what is capital of france".split()) == 1  # one deletion
    assert edit_distance(ref, "so what is the capital of france".split()) == 1  # one insertion
    assert edit_distance(ref, []) == len(ref)
    assert edit_distance([], ["extra", "words"]) == 2


def test_word_error_rate_is_total_edits_over_total_reference_words():
    pairs = [("What is the capital of France?", "what is the capital and friends"),  # 2 of 6
             ("And what is the capital of Japan?", "And what is the capital of Japan.")]  # 0 of 7
    assert word_error_rate(pairs) == pytest.approx(2 / 13)
    assert word_error_rate([("hello there", "")]) == 1.0  # nothing heard: every word deleted
    assert word_error_rate([]) is None


def test_answered_right_needs_the_word_itself():
    assert answered_right("The capital of France is Paris.", "paris")
    assert not answered_right("That is a Parisian question.", "paris")
    assert not answered_right("", "tokyo")


def test_add_noise_is_seeded_and_at_the_asked_snr():
    rng = np.random.default_rng(7)
    speech = (rng.standard_normal(16000) * 3000).astype(np.int16)
    clip = np.concatenate([np.zeros(8000, np.int16), speech, np.zeros(8000, np.int16)])
    noisy = add_noise(clip, 15.0, seed=3)
    assert np.array_equal(noisy, add_noise(clip, 15.0, seed=3))
    assert not np.array_equal(noisy, add_noise(clip, 15.0, seed=4))
    noise = noisy.astype(np.float64) - clip
    snr = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(noise ** 2))
    assert snr == pytest.approx(15.0, abs=0.3)  # the silence around the speech does not lower it


def test_pair_ratios_skip_pairs_where_either_side_did_not_answer():
    pairs = [({"v2v_ms": 600.0}, {"v2v_ms": 500.0}), ({"v2v_ms": 900.0}, {"v2v_ms": 1000.0}),
             ({"v2v_ms": None}, {"v2v_ms": 500.0}), ({"v2v_ms": 700.0}, {})]
    ratios = pair_ratios(pairs)
    assert ratios["pairs"] == 2
    assert ratios["median"] == pytest.approx((1.2 + 0.9) / 2)


def test_summarise_side_per_voice_wer_and_right_answers():
    rows = [{"voice": "a", "reference": "what is the capital of france", "transcript": "what is the capital of france",
             "v2v_ms": 500.0, "user_stopped_ms": 300.0, "right": True},
            {"voice": "b", "reference": "what is the capital of japan", "transcript": "what is capital of japan",
             "v2v_ms": 700.0, "user_stopped_ms": 350.0, "right": False},
            {"voice": "b", "reference": "what is the capital of italy", "failure": "no bot audio"}]
    summary = summarise_side(rows, ("user_stopped_ms",))
    assert (summary["turns"], summary["answered"]) == (3, 2)
    assert summary["p50"] == 600.0
    assert summary["stages_p50"] == {"user_stopped_ms": 325.0}
    assert summary["per_voice"]["a"]["wer"] == 0.0
    assert summary["per_voice"]["b"]["wer"] == pytest.approx(round(7 / 12, 3))  # 1 deletion + 6 unheard
    assert summary["right_answer_rate"] == pytest.approx(0.333)
    assert summary["failures"] == ["no bot audio"]


def test_schedule_takes_voices_in_round_robin_and_each_voices_questions_in_turn():
    from bench.v2v_corpus import Clip, schedule

    def clip(voice, number):
        return Clip(voice, f"q{number}", "x", np.zeros(4, np.int16), 2)

    voices = {"b": [clip("b", 0), clip("b", 1)], "a": [clip("a", 0)]}
    picked = [(c.voice, c.text) for c in schedule(voices, 5)]
    assert picked == [("a", "q0"), ("b", "q0"), ("a", "q0"), ("b", "q1"), ("a", "q0")]


def test_since_is_the_first_moment_at_or_after_the_origin():
    from bench.v2v_pacing import since

    assert since([0.5, 1.2, 1.7], 1.0) == 200.0
    assert since([0.5], 1.0) is None
    assert since([1.2], None) is None


from bench.run import targets  # noqa: E402 - grouped with the tests that use them
from bench.v2v_box import cpu_per_conversation_minute, held, level_summary  # noqa: E402


def _level(n: int, p90: float | None, answered: int = 6, turns: int = 6) -> dict:
    return {"conversations": n, "p90": p90, "answered": answered, "turns": turns}


def test_conversations_held_stop_at_the_first_level_past_twice_the_single_p90():
    assert held([_level(1, 1000), _level(2, 1500), _level(3, 2000), _level(4, 2100)]) == 3
    assert held([_level(1, 1000), _level(2, 2500), _level(3, 1900)]) == 1  # the first failing level ends the count
    assert held([_level(1, 1000), _level(2, 1200, answered=11, turns=12)]) == 1  # a turn unanswered fails the level
    assert held([_level(2, 1000)]) == 0 and held([_level(1, None)]) == 0  # no one-conversation reference


def test_cpu_per_conversation_minute_divides_by_conversations_times_minutes():
    before, after = {"stt": 10.0, "llm": 5.0}, {"stt": 40.0, "llm": 11.0}
    assert cpu_per_conversation_minute(before, after, conversations=2, seconds=30.0) == {"stt": 30.0, "llm": 6.0}


def test_level_summary_counts_answers_failures_and_totals_the_cpu():
    rows = [{"v2v_ms": 900.0, "right": True}, {"v2v_ms": 1100.0, "right": False}, {"failure": "no bot audio"}]
    summary = level_summary(rows, 1, 60.0, {"stt": 2.5, "llm": 1.25})
    assert (summary["turns"], summary["answered"], summary["right_answers"]) == (3, 2, 1)
    assert summary["failures"] == ["no bot audio"] and summary["cpu_s_per_conversation_minute_total"] == 3.75
    assert summary["p50"] == 1000.0


def test_same_model_and_box_targets_are_judged_only_when_measured():
    assert not [row for row in targets({}) if "Pipecat" in row[0]]
    rows = {row[0]: row for row in targets({"v2v_ratio_vs_pipecat": {"of_p50": 0.85},
                                            "conversations_per_box": {"ratio": 0.5}})}
    assert rows["voice-to-voice p50, mesh / Pipecat on the same models, same run"][3] is True
    assert rows["concurrent conversations per box before p90 doubles, mesh / Pipecat"][3] is False
