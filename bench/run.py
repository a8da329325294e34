"""`make bench` / `voicemesh bench`: every measurement, then bench/results/latest.{json,md} and plots.

Stages (each can be skipped with --skip): overhead (mesh and Pipecat at 1/50/100 sessions,
repeated), capacity (sessions per core, both sides), vad (Silero service capacity),
embedded (voice-to-voice and barge-in on the real models), contention (voice-to-voice quiet,
with one core busy and under a CPU limit, and what each service used per turn), same-models
(voice-to-voice against Pipecat 1.14 on the same engines, A B alternating: bench/v2v_compare.py),
box (concurrent spoken conversations per box before p90 doubles, both sides: bench/v2v_box.py).
In the overhead and capacity stages the orchestrator and the
Pipecat process are pinned to core 0, load clients and fakes to core 1. Nothing here fails:
targets are printed as PASS or FAIL. See bench/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench.mesh_side import FAKES, MeshUnderTest
from bench.procs import ROOT, Procs, free_port, pinned, wait_for_port, wait_serving
from bench.scenario import Latencies
from bench.stats import passes, steal_cores, steal_seconds, summarise_runs
from bench.venv import bench_python

RESULTS = ROOT / "bench" / "results"
LEAN, DEFAULTS = "lean", "defaults"
BASELINE_STREAMS = 10  # the VAD's unloaded event latency: enough events for a stable median


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def pipecat_run(sessions: int, duration: float, mode: str, lat: Latencies, core: str | None, warmup: float = 4.0) -> dict:
    python = bench_python()
    if python is None:
        raise RuntimeError("bench/.venv-pipecat is missing: run `make bench` (it builds it)")
    argv = [str(python), "-m", "bench.pipecat_side", "--sessions", str(sessions), "--duration", str(duration),
            "--warmup", str(warmup), *(["--lean"] if mode == LEAN else [])]
    steal0, t0 = steal_seconds(), time.monotonic()
    out = subprocess.run(pinned(argv, core), cwd=ROOT, env={**os.environ, **lat.to_env()}, capture_output=True,
                         text=True, timeout=duration + 120)
    if out.returncode != 0:
        raise RuntimeError(f"pipecat side failed: {out.stderr[-1500:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["steal_cores"] = steal_cores(steal0, steal_seconds(), time.monotonic() - t0)  # over the whole run, warm-up too
    return result


def grpc_round_trip() -> dict:
    """One gRPC round trip between a process on core 0 and one on core 1 (bench/rtt.py)."""
    procs = Procs()
    try:
        port = free_port()
        server = procs.start("rtt-echo", [sys.executable, "-m", "bench.rtt", "serve", "--port", str(port)], cores="1")
        wait_for_port(port, server)
        client = procs.start("rtt-ping", [sys.executable, "-m", "bench.rtt", "ping", "--addr", f"127.0.0.1:{port}"],
                             cores="0", capture=True)
        out, _ = client.communicate(timeout=60)
        return json.loads(out)
    finally:
        procs.stop_all()


def stage_overhead(args, lat: Latencies, results: dict) -> None:
    results["grpc_round_trip_us"] = grpc_round_trip()
    log(f"gRPC round trip between two processes: p50 {results['grpc_round_trip_us']['p50_us']} µs, "
        f"p90 {results['grpc_round_trip_us']['p90_us']} µs")
    mesh, pipecat, pipecat_defaults = {}, {}, {}
    with MeshUnderTest(lat, "0", "1", fakes=args.fakes) as under_test:
        for n in args.sessions:
            runs = [under_test.run_load(n, _duration(args, n)) for _ in range(args.repeats)]
            mesh[str(n)] = summarise_runs(runs)
            log(f"mesh      {n:4d} sessions: added p50 {mesh[str(n)]['p50']} ms, p99 {mesh[str(n)]['p99']} ms, "
                f"cpu {mesh[str(n)]['cpu_cores']} cores, errors {mesh[str(n)]['session_errors']}, "
                f"steal up to {mesh[str(n)]['steal_cores']} cores")
    for n in args.sessions:
        pipecat[str(n)] = summarise_runs([pipecat_run(n, _duration(args, n), LEAN, lat, "0") for _ in range(args.repeats)])
        log(f"pipecat   {n:4d} sessions (lean): added p50 {pipecat[str(n)]['p50']} ms, p99 {pipecat[str(n)]['p99']} ms, "
            f"cpu {pipecat[str(n)]['cpu_cores']}, steal up to {pipecat[str(n)]['steal_cores']} cores")
        pipecat_defaults[str(n)] = summarise_runs([pipecat_run(n, _duration(args, n), DEFAULTS, lat, "0")])
        log(f"pipecat   {n:4d} sessions (defaults, 1 run): added p50 {pipecat_defaults[str(n)]['p50']} ms, "
            f"p99 {pipecat_defaults[str(n)]['p99']} ms, cpu {pipecat_defaults[str(n)]['cpu_cores']}")
    results["mesh_added_latency_ms"] = mesh
    results["pipecat_added_latency_ms"] = pipecat
    results["pipecat_defaults_added_latency_ms"] = pipecat_defaults
    results["mesh_to_pipecat_ratio"] = {
        n: {q: _ratio(mesh[n][q], pipecat[n][q]) for q in ("p50", "p99")} for n in mesh if n in pipecat}


def _duration(args, sessions: int, base: float | None = None) -> float:
    """A single session gives one turn per 4 s cycle: run it longer to have a p99 worth the name."""
    base = args.duration if base is None else base
    return base if sessions > 1 else max(base, 24.0)


def stage_capacity(args, lat: Latencies, results: dict) -> None:
    """Largest N passing, one core. Counts already measured by the overhead stage are reused."""
    def search(name: str, run_one, known: dict) -> dict:
        points = {int(n): s for n, s in known.items()}
        if (points.get(1) or {}).get("p50") is None:
            points[1] = run_one(1)
        for n in args.capacity_steps:
            if n not in points:
                if points and not passes(points[max(points)]):
                    break  # already failing at a smaller count
                points[n] = run_one(n)
                log(f"capacity  {name} {n:4d}: p99 added {points[n]['p99']} ms, cpu {points[n]['cpu_cores']}, "
                    f"underruns {points[n]['underruns']}, errors {points[n]['session_errors']}")
        verdicts = {n: passes(s) for n, s in sorted(points.items())}
        best = max((n for n, ok in verdicts.items() if ok), default=0)
        cpu_at = points[best]["cpu_cores"] if best else None
        return {"sessions_per_core": best, "cpu_cores_at_best": cpu_at,
                "sessions_per_full_core_extrapolated": int(best / cpu_at) if cpu_at else None,
                "points": {str(n): {"p50": s["p50"], "p99": s["p99"], "cpu_cores": s["cpu_cores"],
                                    "underruns": s["underruns"], "missed_turns": s["missed_turns"],
                                    "session_errors": s["session_errors"], "load_side_lag_p99_ms": s.get("client_lag_p99_ms"),
                                    "pass": verdicts[n]} for n, s in sorted(points.items())}}

    with MeshUnderTest(lat, "0", "1", fakes=args.fakes) as under_test:
        results["orchestrator_capacity"] = search(
            "mesh", lambda n: summarise_runs([under_test.run_load(n, _duration(args, n, args.capacity_duration))]),
            results.get("mesh_added_latency_ms", {}))
    results["orchestrator_sessions_per_core"] = results["orchestrator_capacity"]["sessions_per_core"]
    for mode in (LEAN, DEFAULTS):
        known = results.get("pipecat_added_latency_ms" if mode == LEAN else "pipecat_defaults_added_latency_ms", {})
        results[f"pipecat_{mode}_capacity"] = search(
            f"pipecat-{mode}", lambda n, mode=mode: summarise_runs(
                [pipecat_run(n, _duration(args, n, args.capacity_duration), mode, lat, "0")]), known)
    results["pipecat_sessions_per_core"] = {mode: results[f"pipecat_{mode}_capacity"]["sessions_per_core"]
                                            for mode in (LEAN, DEFAULTS)}


def stage_vad(args, results: dict) -> None:
    procs = Procs()
    try:
        port = free_port()
        argv = [sys.executable, "-m", "voicemesh.runtime.serve", "vad", "--host", "127.0.0.1", "--port", str(port)]
        vad = procs.start("vad", argv, cores="0")
        wait_serving(f"127.0.0.1:{port}", vad)
        points = {}
        for n in [BASELINE_STREAMS, *args.vad_steps]:
            argv = [sys.executable, "-m", "bench.vad_side", "--addr", f"127.0.0.1:{port}", "--sessions", str(n),
                    "--duration", str(args.vad_duration), "--server-pid", str(vad.pid)]
            out = subprocess.run(pinned(argv, "1"), cwd=ROOT, capture_output=True, text=True, timeout=args.vad_duration + 120)
            if out.returncode != 0:
                raise RuntimeError(f"vad load failed: {out.stderr[-1500:]}")
            points[n] = json.loads(out.stdout)
            baseline = points[BASELINE_STREAMS]["event_latency_ms"]["p50"] or 0.0
            p99 = points[n]["event_latency_ms"]["p99"]
            if n == BASELINE_STREAMS:  # the reference itself is not judged: its p99 is the worst of ~50 events
                points[n]["pass"] = None
                continue
            points[n]["pass"] = p99 is not None and p99 - baseline < 20.0 and not points[n]["error_count"]
            log(f"vad       {n:4d} streams: event p99 {p99} ms, cpu {points[n]['server_cpu_cores']}, pass {points[n]['pass']}")
            if not points[n]["pass"]:
                break
    finally:
        procs.stop_all()
    best = max((n for n, p in points.items() if p["pass"] and n > BASELINE_STREAMS), default=0)
    results["vad_sessions_per_core"] = best
    results["vad_capacity"] = {"points": {str(n): p for n, p in points.items()},
                               "cpu_cores_at_best": points[best]["server_cpu_cores"] if best else None}
    from bench.vad_batch_probe import probe

    results["vad_batch_probe"] = probe(seconds=0.5)


def stage_embedded(args, results: dict) -> None:
    from bench import embedded
    from voicemesh.cli.mesh import Mesh, free_ports

    with Mesh(ports=free_ports(), log_dir=RESULTS / "logs" / "embedded", ready_timeout=300) as mesh:
        addr = mesh.orchestrator_address
        asyncio.run(embedded.voice_to_voice(addr, 1))  # warm caches; not counted
        v2v = asyncio.run(embedded.voice_to_voice(addr, args.v2v_runs))
        v2v["stage_costs_direct"] = asyncio.run(embedded.stage_costs({k: mesh.address(k) for k in ("llm", "tts")}, 5))
        results["voice_to_voice_ms"] = {"p50": v2v["p50"], "p90": v2v["p90"], "breakdown": _breakdown(v2v, results),
                                        "detail": v2v}
        log(f"voice-to-voice: p50 {v2v['p50']} ms, p90 {v2v['p90']} ms over {v2v['ok_runs']} turns")
        barge = asyncio.run(embedded.barge_in(addr, args.bargein_runs))
        results["bargein_ms"] = barge
        log(f"barge-in: p50 {barge['p50']} ms (signal {barge['signal_p50']} ms) over {barge['ok_runs']} runs")


def stage_contention(args, results: dict) -> None:
    from bench import contention
    from voicemesh.cli.mesh import Mesh, free_ports

    with Mesh(ports=free_ports(), log_dir=RESULTS / "logs" / "contention", ready_timeout=300) as mesh:
        pids = {kind: child.process.pid for kind, child in mesh.children.items()}
        out = contention.run(mesh.orchestrator_address, pids, args.contention_runs, args.contention_limit,
                             args.contention_cpus, log=log)
    results["contention"] = out
    for name, c in out["conditions"].items():
        log(f"contention {name:7s}: p50 {c['p50']} ms, p90 {c['p90']} ms, x{c['ratio_to_quiet_p50']} of quiet, "
            f"answered {c['turns_answered']}/{c['turns_spoken']}")
    if out.get("quiet_was_quiet") is False:
        log(f"contention: WARNING other processes used {out['conditions']['quiet']['other_processes_cores_median']} "
            "cores (median) during the quiet runs: the ratios and the per-turn CPU are not a quiet machine's")
    for kind, u in out["per_service_quiet"].items():
        log(f"contention {kind:12s}: {u['cpu_s_per_turn']} CPU s per turn, peak {u['peak_cores_250ms']} cores, "
            f"peak RSS {u['peak_rss_mib']} MiB, {u['peak_threads']} threads")


def stage_same_models(args, results: dict) -> None:
    """Voice-to-voice against Pipecat on the same engines (bench/v2v_compare.py), A B alternating."""
    from bench import v2v_compare

    figures = v2v_compare.run(args.same_models_turns, v2v_compare.STOP_TIMEOUT_S)
    v2v_compare.write(figures, args.out / "v2v.json", "bench.v2v_plot")
    for key in ("pipecat_embedded_v2v_ms", "mesh_embedded_v2v_ms", "v2v_ratio_vs_pipecat"):
        results[key] = figures[key]
    log(f"same models: mesh p50 {figures['mesh_embedded_v2v_ms']['p50']} ms, Pipecat p50 "
        f"{figures['pipecat_embedded_v2v_ms']['p50']} ms, ratio of p50 {figures['v2v_ratio_vs_pipecat'].get('of_p50')}")


def stage_box(args, results: dict) -> None:
    """Concurrent spoken conversations per box before p90 doubles (bench/v2v_box.py)."""
    from bench import v2v_box, v2v_compare

    figures = v2v_box.run(args.box_levels, args.box_turns)
    v2v_compare.write(figures, args.out / "v2v_box.json", "bench.v2v_box_plot")
    results["conversations_per_box"] = {
        **figures["conversations_per_box"],
        "cpu_s_per_conversation_minute_at_1": {side: figures[side][0]["cpu_s_per_conversation_minute"]
                                               for side in ("mesh", "pipecat")},
    }
    log(f"conversations per box: {figures['conversations_per_box']}")


def _breakdown(v2v: dict, results: dict) -> dict:
    seen = v2v["breakdown_p50"]
    direct = v2v["stage_costs_direct"]
    one = results.get("mesh_added_latency_ms", {}).get("1") or {}
    return {
        "vad_stop_wait": v2v["vad_stop_wait_ms"],
        "end_of_turn_decision": seen["end_of_turn_ms"],  # Smart Turn, plus the VAD's own hop
        "stt_final": seen["stt_final_ms"],
        "llm_first_token": direct["llm_first_token_ms"],
        "tts_first_audio": direct["tts_first_audio_ms"],
        "reply_after_final_seen": seen["reply_after_final_ms"],
        "mesh_hops_fake_mesh_1_session": one.get("p50"),
        "note": "vad_stop_wait + end_of_turn_decision, stt_final and reply_after_final_seen are client-visible and "
                "add up to the total; llm_first_token and tts_first_audio are the services called directly: in the "
                "pipeline they start speculatively at the STT's pause transcript, before the turn is confirmed.",
    }


def targets(results: dict) -> list[tuple[str, str, object, bool | None]]:
    mesh50 = results.get("mesh_added_latency_ms", {}).get("50", {})
    v2v = results.get("voice_to_voice_ms", {})
    barge = results.get("bargein_ms", {})
    limit = (barge.get("start_secs") or 0.2) * 1000 + 60
    rows = [
        ("added mesh latency at 50 sessions, p50", "<= 3 ms", mesh50.get("p50"), _le(mesh50.get("p50"), 3)),
        ("added mesh latency at 50 sessions, p99", "<= 10 ms", mesh50.get("p99"), _le(mesh50.get("p99"), 10)),
        ("real-time sessions per orchestrator core", ">= 150", results.get("orchestrator_sessions_per_core"),
         _ge(results.get("orchestrator_sessions_per_core"), 150)),
        ("VAD sessions per core", ">= 300", results.get("vad_sessions_per_core"), _ge(results.get("vad_sessions_per_core"), 300)),
        ("voice-to-voice, embedded, p50", "<= 800 ms", v2v.get("p50"), _le(v2v.get("p50"), 800)),
        ("barge-in, p50", f"<= {limit:.0f} ms", barge.get("p50"), _le(barge.get("p50"), limit)),
    ]
    same = results.get("v2v_ratio_vs_pipecat", {}).get("of_p50")
    box = results.get("conversations_per_box", {}).get("ratio")
    if "v2v_ratio_vs_pipecat" in results:
        rows.append(("voice-to-voice p50, mesh / Pipecat on the same models, same run", "<= 0.9", same, _le(same, 0.9)))
    if "conversations_per_box" in results:
        rows.append(("concurrent conversations per box before p90 doubles, mesh / Pipecat", ">= 1.0", box, _ge(box, 1.0)))
    contention = results.get("contention")
    if contention:
        ratio = contention.get("busy_to_quiet_p50")
        spoken, answered = contention["turns_spoken_under_contention"], contention["turns_answered_under_contention"]
        by = ", ".join(f"{c} {contention['conditions'][c]['turns_answered']}/{contention['conditions'][c]['turns_spoken']}"
                       for c in ("busy", "limited") if c in contention["conditions"])
        verdict = _le(ratio, 2.0)
        if contention.get("quiet_was_quiet") is False:  # someone else's load in the quiet runs: no verdict
            other = contention["conditions"]["quiet"].get("other_processes_cores_median")
            ratio, verdict = f"{ratio} (quiet runs not quiet: other processes used {other} cores)", None
        rows += [
            ("voice-to-voice p50, one of two cores busy / quiet (same run)", "<= 2.0", ratio, verdict),
            ("spoken turns answered under contention", "all", f"{answered}/{spoken} ({by})",
             None if not spoken else answered == spoken),
        ]
    return rows


def _le(value, limit):
    return None if value is None else value <= limit


def _ge(value, limit):
    return None if value is None else value >= limit


def _ratio(a, b):
    return None if a is None or not b else round(a / b, 2)


def log(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voicemesh bench", description=__doc__)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--sessions", type=ints, default=[1, 50, 100], help="session counts for the overhead stage")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of measured load per run")
    parser.add_argument("--capacity-steps", type=ints, default=[125, 150, 175, 200, 250, 300, 400])
    parser.add_argument("--capacity-duration", type=float, default=20.0)
    parser.add_argument("--vad-duration", type=float, default=10.0)
    parser.add_argument("--vad-steps", type=ints, default=[50, 100, 150, 200, 250, 300, 400])
    parser.add_argument("--v2v-runs", type=int, default=10)
    parser.add_argument("--bargein-runs", type=int, default=5)
    parser.add_argument("--contention-runs", type=int, default=5, help="voice-to-voice runs per contention condition")
    parser.add_argument("--contention-limit", choices=("auto", "cgroup", "affinity"), default="auto",
                        help="how the limited condition holds the services: a cgroup CPU quota (auto: where one can "
                             "be made) or pinning every service thread to cores")
    parser.add_argument("--contention-cpus", type=float, default=1.0, help="CPUs the limited condition allows the services")
    parser.add_argument("--fakes", choices=FAKES, default="wire",
                        help="the services behind the orchestrator in the overhead and capacity stages: bench/fakes.py "
                             "(wire, the default: no servicer cost in the figures) or the real services with "
                             "--provider fake (providers)")
    parser.add_argument("--same-models-turns", type=int, default=20, help="turns per side, voice-to-voice against Pipecat")
    parser.add_argument("--box-levels", type=ints, default=[1, 2, 3, 4, 6, 8], help="concurrent conversations tried per side")
    parser.add_argument("--box-turns", type=int, default=6, help="turns per conversation at each level")
    parser.add_argument("--skip", default="",
                        help="comma-separated stages: overhead,capacity,vad,embedded,contention,same-models,box")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--update", action="store_true",
                        help="start from the existing latest.json and replace only the stages run now")
    args = parser.parse_args(argv)
    skip = set(args.skip.split(",")) - {""}
    lat = Latencies()
    started = time.monotonic()
    results: dict = {"machine": machine(), "latencies_of_fakes": {**lat.__dict__, "total_ms": lat.fakes_total_ms},
                     "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    previous = args.out / "latest.json"
    if args.update and previous.exists():  # keep the stages not run now, with the date each was measured
        kept = json.loads(previous.read_text())
        # Each stage keeps the machine it ran on: this run's for the stages run now (set below).
        results = {**kept, "config": results["config"], "stages_measured": kept.get("stages_measured", {}),
                   "stages_machine": kept.get("stages_machine", {}), "machine": results["machine"]}
    for name, stage in (("overhead", lambda: stage_overhead(args, lat, results)),
                        ("capacity", lambda: stage_capacity(args, lat, results)),
                        ("vad", lambda: stage_vad(args, results)), ("embedded", lambda: stage_embedded(args, results)),
                        ("contention", lambda: stage_contention(args, results)),
                        ("same-models", lambda: stage_same_models(args, results)), ("box", lambda: stage_box(args, results))):
        if name in skip:
            continue
        log(f"== {name} ({time.monotonic() - started:.0f} s so far)")
        stage()
        results.setdefault("stages_measured", {})[name] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results.setdefault("stages_machine", {})[name] = {k: v for k, v in results["machine"].items()
                                                          if k != "load_average_at_end"}
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_seconds"] = round(time.monotonic() - started)  # of this run (with --update: the stages run now)
    results["targets"] = [{"measure": m, "target": t, "value": v, "pass": p} for m, t, v, p in targets(results)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    from bench.report import write_markdown

    write_markdown(results, args.out / "latest.md")
    python = bench_python()
    if python is not None:  # plots need matplotlib, which lives in the bench venv only
        subprocess.run([str(python), "-m", "bench.plots", str(args.out / "latest.json"), str(args.out)], cwd=ROOT, check=False)
    for row in results["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[row["pass"]]
        log(f"{verdict}  {row['measure']}: {row['value']} (target {row['target']})")
    log(f"wrote {args.out / 'latest.json'} and latest.md in {results['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
