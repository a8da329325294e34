"""`make soak`: many sessions for a long time through the mesh with fakes; errors, memory, latency drift.

    python -m bench.soak [--minutes 10] [--sessions 100] [--fakes providers|wire] [--out DIR] [--label NAME]

The real orchestrator in front of the fakes (`--fakes wire`, the default: bench/fakes.py, two
light processes, so 100 real-time sessions fit on 2 cores as in the bench's overhead stage;
`--fakes providers`: the real services with `--provider fake`, a process each, so the servicers'
own memory is soaked too, at a higher CPU cost per session), and bench.soak_load as the
callers: every session lives the whole run, a turn every 4 s cycle. While it runs, every
process's RSS (VmRSS from /proc/PID/status) and CPU are sampled every `--sample-s`. Written to
DIR (bench/results): soak-NAME.json (every sample and turn window), soak-NAME.md (the table
docs/performance.md shows) and soak-NAME.png (RSS and p99 added latency over time; drawn by
bench/soak_plot.py in bench/.venv-pipecat, which has matplotlib).

The rules, from issue 17: no session error, every process alive, and every mesh process's RSS within
±5 % of its value at the end of the warm-up (`--warmup-minutes`, by default a fifth of the run,
at most 2 min) for the rest of the run. The load client's own RSS is recorded but not judged:
it keeps every turn's timing by design. Missed turns (bursts whose turn never got audio) and the
TurnEnded reasons are figures, not rules: when replies come later than the 4 s cycle (an
overloaded machine), the next burst supersedes the turn still waiting (REASON_INTERRUPTED), as
the turn rules say it should. Exit status 1 when a rule fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.mesh_side import FAKES, MeshUnderTest
from bench.procs import ROOT
from bench.scenario import Latencies
from bench.stats import cpu_seconds, percentile
from bench.venv import bench_python

RESULTS = ROOT / "bench" / "results"
RSS_BAND = 0.05  # ±5 % after warm-up (issue 17)


def rss_kib(pid: int) -> int | None:
    """Resident set size in KiB (VmRSS), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def mesh_processes(mesh: MeshUnderTest) -> dict[str, subprocess.Popen]:
    procs = {"orchestrator": mesh.orchestrator}
    for started in mesh.procs.meshes:  # the provider fakes, started together by voicemesh.cli.mesh
        procs.update({kind: child.process for kind, child in started.children.items()})
    for proc in mesh.procs.procs:  # the wire fakes, one process per pair of services
        if proc is not mesh.orchestrator:
            name = next((arg for arg in proc.args if "," in str(arg)), str(proc.pid))
            procs.setdefault(f"fakes-{name.replace(',', '-')}", proc)
    return procs


def sample_until_done(client: subprocess.Popen, procs: dict[str, subprocess.Popen], t0: float, every_s: float,
                      limit_s: float) -> list[dict]:
    """One sample every `every_s` (RSS and CPU seconds per process) until the client exits."""
    samples = []
    deadline = t0 + limit_s
    while client.poll() is None and time.monotonic() < deadline:
        now = time.monotonic()
        row = {"t": round(now - t0, 1), "rss_kib": {}, "cpu_s": {}, "load1": round(os.getloadavg()[0], 2)}
        for name, proc in {**procs, "client": client}.items():
            row["rss_kib"][name] = rss_kib(proc.pid)
            try:
                row["cpu_s"][name] = round(cpu_seconds(proc.pid), 2)
            except OSError:
                row["cpu_s"][name] = None
        samples.append(row)
        time.sleep(max(0.0, now + every_s - time.monotonic()))  # the sampling period itself
    return samples


def rss_verdict(samples: list[dict], names: list[str], warmup_s: float) -> dict:
    """Per process: RSS at the end of the warm-up, the worst deviation from it after, the drift at the end."""
    out = {}
    for name in names:
        after = [(s["t"], s["rss_kib"].get(name)) for s in samples if s["t"] >= warmup_s]
        values = [v for _, v in after if v is not None]
        if not values or len(values) < len(after):
            out[name] = {"ok": False, "why": "process gone during the run" if values else "no sample after warm-up"}
            continue
        base = values[0]
        worst = max(values, key=lambda v: abs(v - base))
        out[name] = {"baseline_mib": round(base / 1024, 1), "min_mib": round(min(values) / 1024, 1),
                     "max_mib": round(max(values) / 1024, 1), "end_mib": round(values[-1] / 1024, 1),
                     "worst_pct": round(100 * (worst - base) / base, 2), "end_pct": round(100 * (values[-1] - base) / base, 2),
                     "ok": all(abs(v - base) <= RSS_BAND * base for v in values)}
    return out


def latency_windows(turns: list, window_s: float, until_s: float) -> list[dict]:
    windows, start = [], 0.0
    while start < until_s:
        added = [a for t, a, _ in turns if start <= t < start + window_s]
        windows.append({"from_s": round(start, 1), "turns": len(added), "p50": _r(percentile(added, 50)),
                        "p99": _r(percentile(added, 99)),
                        "underruns": sum(u for t, _, u in turns if start <= t < start + window_s)})
        start += window_s
    return windows


def _r(value):
    return None if value is None else round(value, 2)


def run(args) -> dict:
    lat = Latencies()
    duration = args.minutes * 60
    warmup_s = args.warmup_minutes * 60 if args.warmup_minutes is not None else min(120.0, duration / 5)
    with MeshUnderTest(lat, orchestrator_cores=None, others_cores=None, fakes=args.fakes) as mesh:
        procs = mesh_processes(mesh)
        argv = [sys.executable, "-m", "bench.soak_load", "--addr", mesh.address, "--sessions", str(args.sessions),
                "--duration", str(duration), "--ramp", str(args.ramp)]
        t0 = time.monotonic()
        client = mesh.procs.start(f"soak-load-{args.label}", argv, lat.to_env(), capture=True)
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.append(client.stdout.read()), daemon=True)  # never a full pipe
        reader.start()
        samples = sample_until_done(client, procs, t0, args.sample_s, duration + args.ramp + 300)
        client.wait(timeout=60)
        reader.join(timeout=60)
        alive = {name: proc.poll() is None for name, proc in procs.items()}
    if client.returncode != 0 or not out or not out[0].strip():
        raise SystemExit(f"the load client failed (exit {client.returncode}); see bench/results/logs/soak-load-{args.label}.log")
    load = json.loads(out[0])
    turns = load["turns"]
    measured = [a for t, a, _ in turns if t >= warmup_s]
    rss = rss_verdict(samples, list(procs), warmup_s)
    cpu = {name: _cores(samples, name, warmup_s) for name in (*procs, "client")}
    result = {
        "what": f"{args.sessions} sessions x {args.minutes:g} min, fakes={args.fakes}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cores": os.cpu_count(), "load1_median": _r(percentile([s["load1"] for s in samples], 50))},
        "sessions": args.sessions, "minutes": args.minutes, "warmup_s": warmup_s, "fakes": args.fakes,
        "turns_answered": len(turns), "turns_missed": len(load["missed"]),
        "turn_ended_reasons": load["turn_ended_reasons"], "session_errors": load["error_count"],
        "errors": load["errors"], "underruns": sum(u for _, _, u in turns),
        "added_ms_after_warmup": {"p50": _r(percentile(measured, 50)), "p99": _r(percentile(measured, 99)),
                                  "max": _r(max(measured, default=None))},
        "rss": rss, "cpu_cores_after_warmup": cpu, "processes_alive_at_end": alive,
        "client_cpu_cores": load["client_cpu_cores"],
        "windows": latency_windows(turns, args.window_s or max(10.0, duration / 20), duration + args.ramp),
        "samples": samples,
    }
    result["rules"] = {"no_session_errors": load["error_count"] == 0, "every_process_alive": all(alive.values()),
                       "rss_flat_5pct": all(v["ok"] for v in rss.values())}
    return result


def _cores(samples: list[dict], name: str, warmup_s: float) -> float | None:
    points = [(s["t"], s["cpu_s"].get(name)) for s in samples if s["t"] >= warmup_s and s["cpu_s"].get(name) is not None]
    if len(points) < 2:
        return None
    return round((points[-1][1] - points[0][1]) / max(points[-1][0] - points[0][0], 1e-6), 3)


def markdown(result: dict) -> str:
    lines = [f"# Soak: {result['what']} ({result['date']})", "",
             f"Machine: {result['machine']['cores']} cores, load average (1 min) median {result['machine']['load1_median']}; "
             f"warm-up {result['warmup_s']:.0f} s.", "",
             "| rule | result |", "|---|---|"]
    lines += [f"| {rule.replace('_', ' ')} | {'PASS' if ok else 'FAIL'} |" for rule, ok in result["rules"].items()]
    added = result["added_ms_after_warmup"]
    lines += ["", f"Turns answered {result['turns_answered']}, missed {result['turns_missed']}, session errors "
              f"{result['session_errors']}, underruns {result['underruns']}; turns ended {result['turn_ended_reasons']}; "
              f"added latency after warm-up p50 {added['p50']} ms, "
              f"p99 {added['p99']} ms, max {added['max']} ms.", "",
              "| process | RSS at warm-up end (MiB) | min | max | end | worst vs warm-up end | CPU (cores) |",
              "|---|---|---|---|---|---|---|"]
    for name, v in result["rss"].items():
        if "baseline_mib" not in v:
            lines.append(f"| {name} | {v['why']} | | | | | |")
            continue
        lines.append(f"| {name} | {v['baseline_mib']} | {v['min_mib']} | {v['max_mib']} | {v['end_mib']} | "
                     f"{v['worst_pct']:+.2f} % | {result['cpu_cores_after_warmup'].get(name)} |")
    lines.append(f"| (load client, not judged) | | | | | | {result['cpu_cores_after_warmup'].get('client')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--warmup-minutes", type=float, default=None, help="default: a fifth of the run, at most 2")
    parser.add_argument("--fakes", choices=FAKES, default="wire")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--window-s", type=float, default=None, help="latency window (default: a 20th of the run, >= 10 s)")
    parser.add_argument("--ramp", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="latest")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"soak-{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    python = bench_python()
    if not args.no_plot and python is not None:
        subprocess.run([str(python), "-m", "bench.soak_plot", str(stem.with_suffix(".json")), str(stem.with_suffix(".png"))],
                       cwd=ROOT, check=False, timeout=120)
    print(markdown(result))
    print(f"written: {stem}.json, .md" + ("" if args.no_plot or python is None else ", .png"))
    return 0 if all(result["rules"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
