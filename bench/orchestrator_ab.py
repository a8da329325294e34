"""Two orchestrators under the same load, alternating: this checkout's against another commit's.

    git worktree add /tmp/old <commit>
    .venv/bin/python -m bench.orchestrator_ab --other /tmp/old --sessions 50 --rounds 3

Each round runs the other commit's orchestrator, then this one's, in front of the wire fakes,
pinned as the overhead stage pins them (orchestrator on core 0, fakes and load on core 1): a
warm-up load, then a measured one. Only the orchestrator's code differs (the other checkout's
`orchestrator/` goes first on PYTHONPATH); fakes, client and protos are this checkout's. Prints
one JSON line per run: added latency p50/p99, turns, the orchestrator's CPU, the client's lag
and the machine's CPU steal over the measured load (as `bench.mesh_side` measures both). Alternation is what makes a difference
worth believing on a noisy machine: compare the pairs, not one run.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench.mesh_side import MeshUnderTest
from bench.scenario import Latencies


def one_run(sessions: int, seconds: float) -> dict:
    with MeshUnderTest(Latencies(), "0", "1") as mesh:
        mesh.run_load(sessions, min(8.0, seconds))  # warm-up: connections, caches, the first turns
        result = mesh.run_load(sessions, seconds)
    return {"p50": result["added_ms"]["p50"], "p99": result["added_ms"]["p99"], "turns": result["turns"],
            "missed_turns": result["missed_turns"], "cpu": result["server_cpu_cores"],
            "client_lag_p99_ms": result["client_lag_ms"]["p99"], "steal_cores": result["steal_cores"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, help="a checkout (e.g. a git worktree) of the commit to compare with")
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=14.0)
    args = parser.parse_args()
    other = Path(args.other, "orchestrator").resolve()
    if not (other / "voicemesh" / "orchestrator").is_dir():
        parser.error(f"{args.other}: no orchestrator/voicemesh/orchestrator there; give a checkout of this repository")
    own_path = os.environ.get("PYTHONPATH")
    for round_number in range(args.rounds):
        for variant in ("other", "this"):
            # The processes inherit this environment: the other commit's orchestrator goes first.
            path = [str(other)] if variant == "other" else []
            path += [own_path] if own_path else []
            if path:
                os.environ["PYTHONPATH"] = os.pathsep.join(path)
            else:
                os.environ.pop("PYTHONPATH", None)
            print(json.dumps({"round": round_number, "variant": variant, **one_run(args.sessions, args.seconds)}), flush=True)


if __name__ == "__main__":
    main()
