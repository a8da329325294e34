"""When the STT's pause decode starts: voice-to-voice on the embedded stack, arm by arm.

The STT decodes as soon as the user has been quiet for `VOICEMESH_STT_PAUSE_MS`, and the
orchestrator starts a speculative reply on that transcript; the VAD stops after 0.2 s and Smart
Turn then decides. The earlier the pause decode, the further the reply is along when the turn is
confirmed, at the cost of more decodes (and speculative replies) on pauses inside a sentence.

Each arm is its own embedded mesh (every service a process, real models) with the STT's pause
set, started in turn, A B C then C B A, one warm-up turn each: the embedded stage's session
(`bench.embedded`: question_capital.wav, Smart Turn on, stop_secs 0.2), and the first-clause
bench's questions in hibari's voice (longer answers). Reported per arm: voice-to-voice p50/p90,
the client-visible breakdown, the replies, and each service's CPU seconds over the measured
turns (/proc/PID/stat), the cost of the extra decodes and speculative replies.

    PYTHONPATH=. .venv/bin/python -m bench.pause_decode --rounds 2 --out bench/results/pause-decode.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from bench import embedded
from bench.contention import snapshot
from bench.first_clause import QUESTIONS, hibari_speech, one_turn
from bench.stats import percentile
from voicemesh.cli.mesh import Mesh, free_ports
from voicemesh.client.wavio import load_for_sending

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {"pause_80": 80, "pause_120": 120, "pause_200": 200}  # arm: VOICEMESH_STT_PAUSE_MS


async def run_arm(addr: str, pids: dict[str, int], turns: int, clips: dict) -> dict:
    capital = load_for_sending(embedded.FIXTURES / "question_capital.wav")
    await embedded.one_voice_to_voice(addr, capital)  # warm caches; not counted
    before = snapshot(pids)
    rows = [await embedded.one_voice_to_voice(addr, capital) for _ in range(turns)]
    questions = [{"question": text, **await one_turn(addr, samples, 4)} for text, samples in clips.items()]
    after = snapshot(pids)
    cpu = {kind: round(after[kind] - before[kind], 2) for kind in pids if before[kind] is not None and after[kind] is not None}
    return {"capital": rows, "questions": questions, "cpu_s": cpu}


def summarise(rows: dict[str, dict]) -> dict:
    summary = {}
    for arm, runs in rows.items():
        capital = [row for run in runs for row in run["capital"]]
        questions = [row for run in runs for row in run["questions"]]
        question_totals = [r["total_ms"] for r in questions if r["ok"]]
        summary[arm] = {
            "pause_ms": ARMS[arm],
            "cpu_s": {kind: round(sum(run["cpu_s"].get(kind, 0.0) for run in runs), 2) for kind in runs[0]["cpu_s"]},
            "capital": embedded.summarise_voice_to_voice(capital),
            "questions": {"turns": len(questions), "answered": len(question_totals),
                          "p50": round(percentile(question_totals, 50), 1) if question_totals else None,
                          "p90": round(percentile(question_totals, 90), 1) if question_totals else None},
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--turns", type=int, default=10, help="question_capital.wav turns per arm per round")
    parser.add_argument("--out", help="write the rows and the summary (JSON) here")
    args = parser.parse_args()
    clips = hibari_speech(QUESTIONS)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for round_index in range(args.rounds):
        for arm in (list(ARMS) if round_index % 2 == 0 else list(ARMS)[::-1]):
            env = {"VOICEMESH_STT_PAUSE_MS": str(ARMS[arm])}
            with Mesh(ports=free_ports(), env=env, log_dir=RESULTS / "logs" / f"pause-decode-{arm}",
                      ready_timeout=300) as mesh:
                pids = {kind: child.process.pid for kind, child in mesh.children.items() if child.process}
                run = asyncio.run(run_arm(mesh.orchestrator_address, pids, args.turns, clips))
            rows[arm].append(run)
            print(arm, json.dumps(summarise({arm: [run]})[arm]), flush=True)
    report = {"started": started, "loadavg_after": os.getloadavg(), "arms": ARMS, "summary": summarise(rows),
              "rows": rows}
    print(json.dumps(report["summary"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
