"""Run pytest several times in a row with one CPU core kept busy by a process the run does not own.

The suite must hold on a slow machine; this is how that is shown. A busy loop
(`python3 -c 'while True: pass'`) is started first, as a sibling of pytest (not its child, so
no test and no fixture can see, stop or wait for it), then pytest runs RUNS times with the
given arguments, each run's output going to its own log. One line per run, then a summary.
The busy loop is stopped by its pid however this ends (a failure, Ctrl-C, SIGTERM).

    .venv/bin/python tests/busy_core.py --runs 5 -- -q
    .venv/bin/python tests/busy_core.py --runs 20 -- -q tests/test_e2e.py tests/test_tracing.py

Exit status 0 only if every run passed and the busy loop kept running throughout.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOG = [sys.executable, "-c", "while True: pass"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (from /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15)


def start_hog(cpu: int | None) -> subprocess.Popen:
    hog = subprocess.Popen(HOG, stdin=subprocess.DEVNULL, start_new_session=True)  # its own session: Ctrl-C is ours
    if cpu is not None:
        os.sched_setaffinity(hog.pid, {cpu})
    time.sleep(0.5)  # not a synchronisation: only a check that it did not die at once
    if hog.poll() is not None:
        raise SystemExit(f"the busy loop exited at once ({hog.returncode})")
    return hog


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM by pid, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def summary_line(log: Path) -> str:
    """pytest's last line ("3 passed in 1.2s"), or the last non-empty one."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "(no output)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="how many pytest runs in a row (default 5)")
    parser.add_argument("--cpu", type=int, default=None, help="pin the busy loop to this CPU (default: let the kernel place it)")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="where each run's output goes (default test-artifacts/busy-core/<time>)")
    parser.add_argument("--stop-on-failure", action="store_true", help="stop after the first failed run")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest (after --)")
    args = parser.parse_args()
    log_dir = args.log_dir or ROOT / "test-artifacts" / "busy-core" / time.strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pytest", *args.pytest_args]

    term = []

    def terminated(signum, frame):
        term.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    hog = start_hog(args.cpu)  # before the SIGTERM handler: a signal now cannot strand it
    signal.signal(signal.SIGTERM, terminated)
    results: list[tuple[int, bool]] = []
    try:
        print(f"busy loop: pid {hog.pid}{f' on CPU {args.cpu}' if args.cpu is not None else ''}; {os.cpu_count()} CPUs; "
              f"{args.runs} runs of: {' '.join(command[1:])}; logs in {log_dir}", flush=True)
        for run in range(1, args.runs + 1):
            log = log_dir / f"run-{run:02d}.log"
            began, hog_began = time.monotonic(), cpu_seconds(hog.pid)
            with open(log, "wb") as out:
                tests = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            try:
                code = tests.wait()
            except KeyboardInterrupt:
                # Ctrl-C reached pytest too (same process group); a SIGTERM of ours did not: pass
                # it on as SIGINT, so that pytest tears its fixtures (and their processes) down.
                if term and tests.poll() is None:
                    tests.send_signal(signal.SIGINT)
                try:
                    tests.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    tests.kill()
                    tests.wait()
                raise
            wall = time.monotonic() - began
            hog_alive = hog.poll() is None
            busy = (cpu_seconds(hog.pid) - hog_began) / wall if hog_alive and wall > 0 else 0.0
            ok = code == 0 and hog_alive
            results.append((code, hog_alive))
            print(f"run {run:2d}/{args.runs}: {'PASS' if ok else 'FAIL'} (exit {code}) {wall:7.1f} s, "
                  f"busy loop {busy:.2f} of a core{'' if hog_alive else ' (IT DIED)'}: {summary_line(log)}  [{log.name}]",
                  flush=True)
            if not hog_alive or (args.stop_on_failure and not ok):
                break
    except KeyboardInterrupt as stopped:
        print(f"interrupted ({stopped or 'Ctrl-C'}) after {len(results)} runs", flush=True)
    finally:
        stop(hog)
    passed = sum(1 for code, alive in results if code == 0 and alive)
    green = passed == len(results) == args.runs
    print(f"summary: {passed}/{args.runs} runs green with one core kept busy (busy loop pid {hog.pid}, stopped)"
          f"{'' if green else ' -- NOT ALL GREEN'}; logs in {log_dir}", flush=True)
    return 0 if green else 1


if __name__ == "__main__":
    sys.exit(main())
