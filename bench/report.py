"""latest.json -> latest.md: the tables the README's Performance section shows."""
from __future__ import annotations

from pathlib import Path


def _fmt(value, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        value = f"{value:.{digits}f}"
    return f"{value}{unit}"


def _cpu(value) -> str:
    return _fmt(value, digits=2)


def _spread(entry: dict, key: str) -> str:
    s = entry.get(f"{key}_spread") or {}
    if not s.get("runs"):
        return _fmt(entry.get(key))
    if s["runs"] == 1:
        return _fmt(s["median"])
    return f"{_fmt(s['median'])} ({_fmt(s['min'])}–{_fmt(s['max'])})"


def write_markdown(results: dict, path: Path) -> None:
    lines = []
    m = results["machine"]
    lines += [f"Machine: {m['cores']} cores, {m['cpu_model']}, Python {m['python']}; load average "
              f"{m.get('load_average_at_start')} at start, {m.get('load_average_at_end')} at end; "
              f"{results.get('wall_seconds')} s in all.", ""]
    if results.get("stages_measured"):  # --update runs: each stage was measured when and where it says
        machines = results.get("stages_machine", {})
        dates = {**{k: v.get("measured", "an earlier run") for k, v in machines.items()}, **results["stages_measured"]}
        lines += ["When and where each stage was measured: " + ", ".join(
            f"{stage} ({when}{', ' + machines[stage]['cpu_model'] if stage in machines else ''})"
            for stage, when in dates.items()) + ".", ""]
    lines += ["| measure | target | measured | |", "|---|---|---|---|"]
    for row in results.get("targets", []):
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[row["pass"]]
        lines.append(f"| {row['measure']} | {row['target']} | {_fmt(row['value'])} | {verdict} |")
    mesh, pipecat = results.get("mesh_added_latency_ms"), results.get("pipecat_added_latency_ms")
    if mesh and pipecat:
        defaults = results.get("pipecat_defaults_added_latency_ms", {})
        ratio = results.get("mesh_to_pipecat_ratio", {})
        lines += ["", "Added latency per turn (ms; end of user speech to first bot audio, minus the fakes' "
                  f"{results['latencies_of_fakes']['total_ms']:.0f} ms), median of repeated runs (min–max); "
                  "server process pinned to one core:", "",
                  "| sessions | mesh p50 | mesh p99 | Pipecat lean p50 "
                  "| Pipecat lean p99 | mesh/Pipecat p50 | mesh/Pipecat p99 "
                  "| Pipecat defaults p50 / p99 | CPU mesh / Pipecat lean (cores) | CPU steal, worst run, mesh / Pipecat lean "
                  "(cores) | mesh session errors |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in mesh:
            a, b, d = mesh[n], pipecat.get(n, {}), defaults.get(n, {})
            r = ratio.get(n, {})
            lines.append(f"| {n} | {_spread(a, 'p50')} | {_spread(a, 'p99')} "
                         f"| {_spread(b, 'p50')} | {_spread(b, 'p99')} "
                         f"| {_fmt(r.get('p50'), digits=2)} | {_fmt(r.get('p99'), digits=2)} "
                         f"| {_fmt(d.get('p50'))} / {_fmt(d.get('p99'))} "
                         f"| {_cpu(a.get('cpu_cores'))} / {_cpu(b.get('cpu_cores'))} "
                         f"| {_cpu(a.get('steal_cores'))} / {_cpu(b.get('steal_cores'))} | {a.get('session_errors')} |")
    rtt = results.get("grpc_round_trip_us")
    if rtt:
        lines += ["", f"One gRPC round trip between two processes here (grpc.aio on uvloop, loopback, a 640-byte "
                  f"message each way, cores 0 and 1, loops idle): p50 {rtt['p50_us']} µs, p90 {rtt['p90_us']} µs. "
                  f"A mesh turn's critical path crosses five (client, VAD, STT, LLM, TTS): about "
                  f"{5 * rtt['p50_us'] / 1000:.1f} ms of the mesh's added latency before any of its own work. CPU steal is "
                  "the time the hypervisor gave this machine's cores to other machines while they had work: where it "
                  "is a tenth of a core or more, the run measured the neighbours as much as the code."]
    caps = [(name, results.get(key)) for name, key in (("orchestrator (mesh)", "orchestrator_capacity"),
                                                       ("Pipecat, lean", "pipecat_lean_capacity"),
                                                       ("Pipecat, defaults", "pipecat_defaults_capacity"))]
    if any(c for _, c in caps):
        lines += ["", "Real-time sessions on one core (largest N tried with every turn answered, no underruns and p99 "
                  "added latency < 20 ms):", "",
                  "| side | sessions per core | CPU at that N (cores) | N per full core, extrapolated |",
                  "|---|---|---|---|"]
        for name, cap in caps:
            if cap:
                lines.append(f"| {name} | {cap['sessions_per_core']} | {_cpu(cap['cpu_cores_at_best'])} "
                             f"| {_fmt(cap['sessions_per_full_core_extrapolated'])} |")
    vad = results.get("vad_capacity")
    if vad:
        lines += ["", "VAD service (Silero), one core: SpeechStopped event latency by stream count:", "",
                  "| streams | p50 ms | p99 ms | CPU (cores) | pass |", "|---|---|---|---|---|"]
        for n, p in vad["points"].items():
            lines.append(f"| {n} | {_fmt(p['event_latency_ms']['p50'])} | {_fmt(p['event_latency_ms']['p99'])} "
                         f"| {_cpu(p['server_cpu_cores'])} | {'reference' if p['pass'] is None else p['pass']} |")
    v2v = results.get("voice_to_voice_ms")
    if v2v:
        b = v2v["breakdown"]
        lines += ["", f"Voice-to-voice, embedded stack, 2 cores ({v2v['detail']['ok_runs']} turns): p50 {_fmt(v2v['p50'])} ms, "
                  f"p90 {_fmt(v2v['p90'])} ms. Breakdown (p50, ms):", "",
                  "| VAD stop wait | end-of-turn decision | STT final | reply after final (seen) | LLM first token (direct) "
                  "| TTS first audio (direct) | mesh hops (fake mesh, 1 session) |",
                  "|---|---|---|---|---|---|---|",
                  f"| {_fmt(b['vad_stop_wait'])} | {_fmt(b['end_of_turn_decision'])} | {_fmt(b['stt_final'])} "
                  f"| {_fmt(b['reply_after_final_seen'])} | {_fmt(b['llm_first_token'])} | {_fmt(b['tts_first_audio'])} "
                  f"| {_fmt(b['mesh_hops_fake_mesh_1_session'])} |"]
    barge = results.get("bargein_ms")
    if barge:
        lines += ["", f"Barge-in ({barge['ok_runs']} runs, start_secs {barge['start_secs']}): onset of user speech to "
                  f"bot audio stopped at the client p50 {_fmt(barge['p50'])} ms (last audio and interruption event both in); "
                  f"last bot audio arrival {_fmt(barge.get('stream_stop_p50'))} ms; "
                  f"interruption event {_fmt(barge['signal_p50'])} ms; "
                  f"end of the audio already received, for a client that does not flush: "
                  f"{_fmt(barge['audible_without_flush_p50'])} ms."]
    lines += _contention(results.get("contention"))
    lines += _same_models(results)
    path.write_text("\n".join(lines) + "\n")


def _contention(c: dict | None) -> list[str]:
    if not c:
        return []
    conditions = c["conditions"]
    limited = conditions.get("limited", {})
    throttled = limited.get("throttled")
    busy = conditions.get("busy", {})
    lines = ["", f"Contention, embedded stack, {c.get('cpu_count')} cores ({c['runs_per_condition']} runs per condition, "
             "interleaved, one mesh): busy = an unrelated `while True: pass` process in its own session "
             f"(it got {_fmt(busy.get('hog_cores_median'), digits=2)} cores); limited = {limited.get('limit', 'n/a')}"
             + (f", throttled in {throttled['throttled_periods']} of {throttled['periods']} periods "
                f"({_fmt(throttled['throttled_s'])} s)" if throttled else "") + ".", "",
             "| condition | turns answered / spoken | p50 ms | p90 ms | p50 / quiet p50 | end-of-turn decision | STT final "
             "| reply after final | other processes (cores) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in conditions.items():
        b = row.get("breakdown_p50") or {}
        lines.append(f"| {name} | {row['turns_answered']}/{row['turns_spoken']} | {_fmt(row['p50'])} | {_fmt(row['p90'])} "
                     f"| {_fmt(row['ratio_to_quiet_p50'], digits=2)} | {_fmt(b.get('end_of_turn_ms'))} "
                     f"| {_fmt(b.get('stt_final_ms'))} | {_fmt(b.get('reply_after_final_ms'))} "
                     f"| {_fmt(row.get('other_processes_cores_median'), digits=2)} |")
    if c.get("quiet_was_quiet") is False:
        lines += ["", "**The quiet runs were not quiet** (other processes above 0.25 cores): the ratios and the CPU "
                  "per turn below are not a quiet machine's."]
    usage = c.get("per_service_quiet") or {}
    if usage:
        lines += ["", f"What each service process used in the quiet runs ({c.get('quiet_turns_answered')} answered turns, "
                  f"one conversation at a time, sessions of {_fmt(c.get('quiet_session_s_mean'))} s; CPU net of the "
                  "idle baseline, including the work after the caller hangs up):", "",
                  "| service | CPU s per turn | mean cores while a conversation is open | peak cores (250 ms) "
                  "| peak RSS MiB | RSS MiB at end | threads |", "|---|---|---|---|---|---|---|"]
        for kind, u in usage.items():
            lines.append(f"| {kind} | {_fmt(u['cpu_s_per_turn'], digits=2)} | {_fmt(u['mean_cores_while_open'], digits=2)} "
                         f"| {_fmt(u['peak_cores_250ms'], digits=2)} | {_fmt(u['peak_rss_mib'])} | {_fmt(u['rss_mib'])} "
                         f"| {_fmt(u['peak_threads'])} |")
    return lines


def _same_models(results: dict) -> list[str]:
    lines = []
    a, b = results.get("mesh_embedded_v2v_ms"), results.get("pipecat_embedded_v2v_ms")
    if a and b:
        ratio = results["v2v_ratio_vs_pipecat"]
        lines += ["", f"Voice-to-voice against Pipecat 1.14 on the same engines, same run, A B alternating "
                  f"({ratio['pairs']} pairs; bench/results/v2v.json): mesh p50 {_fmt(a['p50'])} / p90 {_fmt(a['p90'])} ms, "
                  f"Pipecat p50 {_fmt(b['p50'])} / p90 {_fmt(b['p90'])} ms; ratio of p50 {_fmt(ratio.get('of_p50'), digits=2)}, "
                  f"pair by pair median {_fmt(ratio['median'], digits=2)}."]
    box = results.get("conversations_per_box")
    if box:
        cpu = box["cpu_s_per_conversation_minute_at_1"]
        lines += ["", f"Concurrent spoken conversations on this box before voice-to-voice p90 doubles "
                  f"(bench/results/v2v_box.json): mesh {box['mesh']}, Pipecat (one process per call) {box['pipecat']} "
                  f"of {box['levels_tried']} tried; CPU-seconds per minute of one conversation: mesh "
                  + ", ".join(f"{k} {v}" for k, v in cpu["mesh"].items()) + "; Pipecat "
                  + ", ".join(f"{k} {v}" for k, v in cpu["pipecat"].items()) + "."]
    return lines


if __name__ == "__main__":  # regenerate latest.md from a latest.json
    import json
    import sys

    source = Path(sys.argv[1])
    write_markdown(json.loads(source.read_text()), source.with_suffix(".md"))

