"""Smart Turn's end-of-turn probability on complete requests as the silence after them grows.

Why the VAD asks Smart Turn again while it holds a doubted stop (segmenter.py,
`smart_turn_recheck_secs`): for each complete request (the voice-to-voice corpus, plus four
longer requests in five espeak-ng voices), the model scores the speech followed by 0.2, 0.4,
0.6, 1.0 and 1.5 s of silence; the output counts, per tail, the requests it doubted (below the
0.5 threshold), which without a second question wait for the 3 s silence fallback.

    .venv/bin/python -m bench.smart_turn_tails [--out FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np

from bench.v2v_corpus import build_corpus, espeak_available, espeak_clips
from voicemesh.client.wavio import SEND_RATE_HZ
from voicemesh.vad.smart_turn import SmartTurnModel, find_model

TAILS_S = (0.2, 0.4, 0.6, 1.0, 1.5)
THRESHOLD = 0.5  # SegmenterParams.smart_turn_threshold's default
REQUESTS = ("Could you set a timer for twelve minutes, please?",
            "Tell me a short story about a dragon who loves to bake bread.",
            "What's the weather like in Edinburgh tomorrow morning?",
            "Remind me to call my sister at half past six.")
VOICES = ("en-us", "en-gb", "en-029", "en-gb-x-rp", "en-us+f3")


def requests() -> list[tuple[str, str, np.ndarray]]:
    """(voice, text, int16 speech after v2v_corpus.LEAD_S of silence, ending at its last speech sample)."""
    clips = [(voice, clip) for voice, clips in build_corpus()[0].items() for clip in clips]
    if espeak_available():
        clips += [(f"espeak-{voice}", clip) for voice in VOICES
                  for clip in espeak_clips(voice, tuple((text, "") for text in REQUESTS))]
    return [(voice, clip.text, clip.samples[: clip.speech_end]) for voice, clip in clips]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="also write the rows and counts (JSON) here")
    args = parser.parse_args()
    model = SmartTurnModel(find_model())
    asyncio.run(model.load())
    rows = []
    for voice, text, speech in requests():
        scores = [model.score_blocking(np.concatenate([speech, np.zeros(int(tail * SEND_RATE_HZ), np.int16)]))
                  for tail in TAILS_S]
        rows.append({"voice": voice, "text": text, "scores": [round(p, 3) for p in scores]})
        print(f"{voice:24s} {text[:44]:44s} " + " ".join(f"{p:.2f}" for p in scores))
    doubted = {f"{tail:g}s": sum(row["scores"][i] < THRESHOLD for row in rows) for i, tail in enumerate(TAILS_S)}
    print(f"doubted (below {THRESHOLD}) of {len(rows)}: {doubted}")
    if args.out:
        args.out.write_text(json.dumps({"tails_s": TAILS_S, "threshold": THRESHOLD, "doubted": doubted,
                                        "requests": len(rows), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
