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
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bench.v2v_corpus import build_corpus, espeak_available
from voicemesh.client.wavio import SEND_RATE_HZ, load_for_sending, speech_segments
from voicemesh.vad.smart_turn import SmartTurnModel, find_model

TAILS_S = (0.2, 0.4, 0.6, 1.0, 1.5)
THRESHOLD = 0.5  # SegmenterParams.smart_turn_threshold's default
LEAD_S = 0.5
REQUESTS = ("Could you set a timer for twelve minutes, please?",
            "Tell me a short story about a dragon who loves to bake bread.",
            "What's the weather like in Edinburgh tomorrow morning?",
            "Remind me to call my sister at half past six.")
VOICES = ("en-us", "en-gb", "en-029", "en-gb-x-rp", "en-us+f3")


def requests() -> list[tuple[str, str, np.ndarray]]:
    """(voice, text, int16 speech ending at its last speech sample)."""
    out = [(voice, clip.text, clip.samples[: clip.speech_end]) for voice, clips in build_corpus()[0].items()
           for clip in clips]
    if not espeak_available():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        for voice in VOICES:
            for number, text in enumerate(REQUESTS):
                wav = Path(tmp) / f"{number}.wav"
                subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True, capture_output=True,
                               timeout=30)
                audio = load_for_sending(wav)
                segments = speech_segments(audio, SEND_RATE_HZ)
                start = max(0, segments[0].start - int(LEAD_S * SEND_RATE_HZ))
                out.append((f"espeak-{voice}", text, audio[start: segments[-1].end]))
    return out


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
