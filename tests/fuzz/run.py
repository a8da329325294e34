"""`make fuzz`: the fuzz module at a larger budget (scale 5: 10,000 cases), with a seed of its own
(printed, so a run can be repeated with --seed), then the count per RPC and what it found.

    .venv/bin/python tests/fuzz/run.py [--scale 5] [--seed N] [--report PATH] [-- pytest args]

Exit status: pytest's, or 1 when fewer than --min-cases cases ran.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=5.0, help="budget multiplier (CI runs 1: 2,000 cases)")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: a new one, printed)")
    parser.add_argument("--min-cases", type=int, default=10_000, help="fail if fewer cases ran")
    parser.add_argument("--report", type=Path, default=ROOT / "test-artifacts" / "fuzz-report.json")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.unlink(missing_ok=True)
    env = {**os.environ, "VOICEMESH_FUZZ_SCALE": str(args.scale), "VOICEMESH_FUZZ_SEED": str(seed),
           "VOICEMESH_FUZZ_REPORT": str(args.report)}
    print(f"fuzz: scale {args.scale:g}, seed {seed} (repeat with --seed {seed})", flush=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}",
               str(ROOT / "tests" / "fuzz"), *args.pytest_args]
    code = subprocess.call(command, cwd=ROOT, env=env)
    if not args.report.exists():
        print("fuzz: no report was written (the mesh did not start?)")
        return code or 1
    report = json.loads(args.report.read_text())
    total = summarize(report)
    print(f"report: {args.report}")
    if total < args.min_cases:
        print(f"fuzz: only {total} cases ran, fewer than {args.min_cases}")
        return code or 1
    return code


def summarize(report: dict) -> int:
    rows = report["rpcs"]
    width = max(len(name) for name in rows)
    print(f"\n{'rpc':<{width}}  {'cases':>6}  {'messages':>8}  {'slowest':>8}  statuses")
    total = findings = 0
    for name, row in rows.items():
        statuses = ", ".join(f"{code} {count}" for code, count in sorted(row["statuses"].items()))
        print(f"{name:<{width}}  {row['cases']:>6}  {row['messages']:>8}  {row['slowest_s']:>7.2f}s  {statuses}")
        total += row["cases"]
        findings += len(row["findings"])
    print(f"{'total':<{width}}  {total:>6}")
    healthy = report.get("healthy_session", {})
    print(f"healthy session: {healthy.get('turns', 0)} turns answered, problems: {healthy.get('problems') or 'none'}")
    for name, row in rows.items():
        for error, count in row.get("in_band", {}).items():
            print(f"in-band error on {name} ({count}x): {error}")
    print(f"findings: {findings or 'none'}")
    for name, row in rows.items():
        for finding in row["findings"]:
            print(f"- {name}: {'; '.join(finding['problems'])}")
            for request in finding["requests"][:12]:
                print(f"    {request[:200]}")
    return total


if __name__ == "__main__":
    sys.exit(main())
