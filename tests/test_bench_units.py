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
    from conftest import Processes, free_port
    from voicemesh.launcher import wait_for_port

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
