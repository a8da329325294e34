"""The clips both sides of the voice-to-voice comparison hear (bench/v2v_compare.py).

Voices: the hibari fixtures of tests/fixtures ("What is the capital of France?", and the
Japan question cut out of two_questions.wav), espeak-ng's en-us and en-gb voices on four
capital-city questions when espeak-ng is installed, and white noise at 15 dB SNR over a
hibari and an espeak clip (seeded). Each clip is 16 kHz PCM16 with 0.5 s of silence before
the speech and `TAIL_S` of silence (or noise) after it, and knows the sample where its speech
ends: the reference point of voice-to-voice latency.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.v2v_stats import add_noise
from voicemesh.client.wavio import SEND_RATE_HZ, load_for_sending, speech_segments

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
LEAD_S = 0.5
TAIL_S = 12.0  # silence after the speech: enough for the slowest reply seen, then the turn times out
SNR_DB = 15.0
QUESTIONS = (("What is the capital of France?", "paris"), ("What is the capital of Japan?", "tokyo"),
             ("What is the capital of Germany?", "berlin"), ("What is the capital of Italy?", "rome"))
ESPEAK_VOICES = ("en-us", "en-gb")


@dataclass(frozen=True)
class Clip:
    voice: str
    text: str  # what is said: the WER reference
    expected: str  # the word a right answer contains
    samples: np.ndarray  # 16 kHz int16: lead, speech, tail
    speech_end: int  # index of the first sample after the speech

    def save(self, path: Path) -> Path:
        """Raw little-endian PCM16, the form the Pipecat process reads."""
        path.write_bytes(self.samples.astype("<i2").tobytes())
        return path


def _framed(voice: str, text: str, expected: str, speech: np.ndarray, speech_end: int) -> Clip:
    lead = np.zeros(int(LEAD_S * SEND_RATE_HZ), np.int16)
    tail = np.zeros(int(TAIL_S * SEND_RATE_HZ), np.int16)
    return Clip(voice, text, expected, np.concatenate([lead, speech, tail]), len(lead) + speech_end)


def hibari_clips() -> list[Clip]:
    """The fixtures' questions, with the speech ends fixtures.json records."""
    table = json.loads((FIXTURES / "fixtures.json").read_text())
    clips = []
    for name, index, expected in (("question_capital.wav", 0, "paris"), ("two_questions.wav", 1, "tokyo")):
        spoken = table[name][index]
        audio = load_for_sending(FIXTURES / name)
        start, end = (int(spoken[k] * SEND_RATE_HZ / 1000) for k in ("start_ms", "end_ms"))
        clips.append(_framed("hibari", spoken["text"], expected, audio[start:end], end - start))
    return clips


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_clips(voice: str, questions: tuple[tuple[str, str], ...] = QUESTIONS) -> list[Clip]:
    """`questions`: (what is said, the word a right answer contains) pairs."""
    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        for number, (text, expected) in enumerate(questions):
            wav = Path(tmp) / f"{number}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True, timeout=30,
                           capture_output=True)
            audio = load_for_sending(wav)
            segments = speech_segments(audio, SEND_RATE_HZ)
            if not segments:
                raise RuntimeError(f"espeak-ng {voice} produced no speech for {text!r}")
            start, end = segments[0].start, segments[-1].end
            clips.append(_framed(f"espeak-{voice}", text, expected, audio[start:end], end - start))
    return clips


def noisy(clip: Clip, seed: int) -> Clip:
    return Clip(f"{clip.voice}+noise{SNR_DB:g}dB", clip.text, clip.expected, add_noise(clip.samples, SNR_DB, seed),
                clip.speech_end)


def build_corpus() -> tuple[dict[str, list[Clip]], list[str]]:
    """Voice -> its clips, and notes on what could not be built (espeak-ng missing)."""
    notes = []
    voices = {"hibari": hibari_clips()}
    if espeak_available():
        for voice in ESPEAK_VOICES:
            voices[f"espeak-{voice}"] = espeak_clips(voice)
    else:
        notes.append("espeak-ng is not installed (`make apt` installs it): no espeak voices")
    base = voices.get("espeak-en-us", [])
    voices[f"hibari+noise{SNR_DB:g}dB"] = [noisy(c, seed) for seed, c in enumerate(voices["hibari"])]
    if base:
        voices[f"espeak-en-us+noise{SNR_DB:g}dB"] = [noisy(c, 100 + seed) for seed, c in enumerate(base)]
    return voices, notes


def schedule(voices: dict[str, list[Clip]], turns: int) -> list[Clip]:
    """`turns` clips, voices in round robin and each voice's questions in turn, so any prefix
    of the run covers every voice about equally."""
    names = sorted(voices)
    return [voices[names[k % len(names)]][(k // len(names)) % len(voices[names[k % len(names)]])]
            for k in range(turns)]
