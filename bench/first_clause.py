"""The "shorter first sentence" lever: voice-to-voice with the first spoken piece cut at a clause.

A reply's first piece goes to the TTS when its first sentence is complete; with
TurnOptions.first_clause_words it may go at the first clause end ("Paris, the capital of
France,") once it has that many words. The lever only changes replies whose first sentence has
a clause, so this asks questions whose answers tend to (the fixtures' "capital of" questions
get one short sentence, where nothing changes).

Both arms run in one embedded mesh (every service its own process, real models), paired: each
question is asked in arm A and arm B back to back (A B in one round, B A in the next), with the same LLM seed, so
both arms get the same reply text and only where the first piece ends differs. Reported per
arm: voice-to-voice p50/p90 (end of user speech in the clip to first bot audio at the client),
the pairwise difference, and the first piece spoken.

    PYTHONPATH=. .venv/bin/python -m bench.first_clause --rounds 2 --out bench/results/first-clause.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from bench.stats import percentile
from voicemesh.cli.mesh import Mesh, free_ports
from voicemesh.client.session import talk_session
from voicemesh.client.wavio import to_pcm16
from voicemesh.v1 import orchestrator_pb2 as pb

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = (
    "Tell me about Paris.",
    "Why is the sky blue?",
    "What should I pack for a trip to London?",
    "How do plants make their food?",
    "Who was Albert Einstein?",
    "How can I sleep better?",
)
ARMS = {"clause": 4, "sentence": 0}  # arm name: TurnOptions.first_clause_words
SEED = 7


def hibari_speech(texts: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each question in hibari's voice, 16 kHz int16, with 0.5 s of silence before and 1.5 s after."""
    import hibari  # the TTS service's engine, in this process before the mesh starts

    tts = hibari.Hibari(threads=2)
    quiet_before, quiet_after = np.zeros(8000, np.int16), np.zeros(24000, np.int16)
    return {text: np.concatenate([quiet_before, to_pcm16(tts(text, seed=0).astype(np.float32), hibari.SAMPLE_RATE),
                                  quiet_after]) for text in texts}


async def one_turn(addr: str, samples: np.ndarray, clause_words: int) -> dict:
    pieces: list[str] = []

    def on_event(response) -> None:
        if response.WhichOneof("event") == "bot_text":
            pieces.append(response.bot_text.text)

    def configure(config: pb.SessionConfig) -> None:
        config.turn.smart_turn = True
        config.turn.first_clause_words = clause_words
        config.llm_params.seed = SEED

    result = await talk_session(addr, samples, on_event=on_event, wait_after=15.0, configure=configure)
    turn = result.turns[0] if result.turns else None
    if turn is None or turn.latency_ms is None:
        return {"ok": False, "failure": result.failure or "no latency for the turn"}
    return {"ok": True, "total_ms": round(turn.latency_ms, 1), "first_piece": pieces[0] if pieces else "",
            "reply": " ".join(pieces)}


async def measure(addr: str, rounds: int, clips: dict[str, np.ndarray]) -> dict:
    rows: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for round_index in range(rounds):
        for number, (text, samples) in enumerate(clips.items()):
            order = list(ARMS) if (round_index + number) % 2 == 0 else list(ARMS)[::-1]  # each question: A B, then B A
            for arm in order:
                row = {"question": text, **await one_turn(addr, samples, ARMS[arm])}
                rows[arm].append(row)
                print(arm, json.dumps(row), flush=True)
    return rows


def summarise(rows: dict[str, list[dict]]) -> dict:
    summary = {}
    for arm, arm_rows in rows.items():
        totals = [r["total_ms"] for r in arm_rows if r["ok"]]
        summary[arm] = {"first_clause_words": ARMS[arm], "turns": len(arm_rows), "answered": len(totals),
                        "p50": round(percentile(totals, 50), 1) if totals else None,
                        "p90": round(percentile(totals, 90), 1) if totals else None}
    pairs = [(a, b) for a, b in zip(rows["clause"], rows["sentence"], strict=True) if a["ok"] and b["ok"]]
    cut = [(a, b) for a, b in pairs if a["first_piece"] != b["first_piece"]]
    summary["pairs"] = {
        "answered_both": len(pairs),
        "same_reply_text": sum(a["reply"] == b["reply"] for a, b in pairs),
        "first_piece_cut_at_a_clause": len(cut),
        "saved_ms_median_all": round(statistics.median(b["total_ms"] - a["total_ms"] for a, b in pairs), 1) if pairs else None,
        "saved_ms_median_where_cut": round(statistics.median(b["total_ms"] - a["total_ms"] for a, b in cut), 1) if cut else None,
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="write the rows and the summary (JSON) here")
    args = parser.parse_args()
    clips = hibari_speech(QUESTIONS)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with Mesh(ports=free_ports(), log_dir=RESULTS / "logs" / "first-clause", ready_timeout=300) as mesh:
        addr = mesh.orchestrator_address
        asyncio.run(one_turn(addr, clips[QUESTIONS[0]], 0))  # warm caches; not counted
        rows = asyncio.run(measure(addr, args.rounds, clips))
    report = {"started": started, "loadavg_after": os.getloadavg(), "questions": QUESTIONS, "seed": SEED,
              "summary": summarise(rows), "rows": rows}
    print(json.dumps(report["summary"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
