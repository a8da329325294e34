"""The load scenario both sides run: fixed fake latencies and one caller's audio schedule.

Imported by the mesh side (fake services, load client) and by the Pipecat anchor (its own
venv), so it depends on the standard library and numpy only.

A caller sends 20 ms PCM16 16 kHz frames at real time (50 frames/s) for the whole session.
Each cycle: `speech_s` of a loud 220 Hz tone (the fake VADs call a frame speech by its
energy), then silence until the next cycle. The bot's reply to each turn plays inside the
silence, so nobody talks over the bot. Durations are multiples of 160 ms, the least common
multiple of the mesh's 20 ms frames and Pipecat's 32 ms VAD windows, so neither VAD gains
or loses a window to alignment.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

FRAME_MS = 20
IN_RATE_HZ = 16000
OUT_RATE_HZ = 24000
FRAME_SAMPLES = IN_RATE_HZ * FRAME_MS // 1000
SPEECH_RMS = 1000.0  # a 20 ms frame (or 32 ms window) louder than this is speech
TONE_AMPLITUDE = 8000


@dataclass(frozen=True)
class Latencies:
    """What the fakes cost, on purpose. Their sum is subtracted from each turn's latency."""

    vad_start_s: float = 0.16  # speech needed to start a turn
    vad_stop_s: float = 0.32  # silence needed to end it (the VAD stop wait)
    stt_final_ms: float = 40.0  # Finalize -> final transcript
    llm_first_token_ms: float = 100.0  # request -> first text (the whole first sentence)
    llm_token_ms: float = 20.0  # then one word per this
    tts_first_audio_ms: float = 30.0  # text piece -> first audio
    tts_sentence_ms: float = 800.0  # audio length of each sentence
    tts_chunk_ms: int = 40  # TTS audio chunk size

    @property
    def fakes_total_ms(self) -> float:
        """End of user speech to first bot audio if every hop were free."""
        return self.vad_stop_s * 1000 + self.stt_final_ms + self.llm_first_token_ms + self.tts_first_audio_ms

    def to_env(self) -> dict[str, str]:
        return {"BENCH_LATENCIES": json.dumps(asdict(self))}

    def fake_script(self) -> dict:
        """These latencies as the script of the `fake` providers (voicemesh.runtime.fakes.FakeScript
        fields): the same behaviour as bench/fakes.py, behind the real servicers."""
        return {
            "speech_rms": SPEECH_RMS, "words_per_second": 0, "fallback": TRANSCRIPT, "stt_final_ms": self.stt_final_ms,
            "reply": " ".join((FIRST_DELTA, *REST_WORDS)), "llm_first_delta_words": len(FIRST_DELTA.split()),
            "llm_first_token_ms": self.llm_first_token_ms, "llm_token_ms": self.llm_token_ms,
            "tts_first_audio_ms": self.tts_first_audio_ms, "tts_sentence_ms": self.tts_sentence_ms,
            "tts_chunk_ms": self.tts_chunk_ms, "tone_amplitude": BOT_TONE_AMPLITUDE,
        }

    @classmethod
    def from_env(cls) -> "Latencies":
        raw = os.environ.get("BENCH_LATENCIES")
        return cls(**json.loads(raw)) if raw else cls()


TRANSCRIPT = "what is the capital of france"  # every final the fake STTs give
BOT_TONE_AMPLITUDE = 3000

# The reply: the first delta is the whole first sentence plus the next word, so a sentence
# splitter that looks one character ahead (both sides do) releases it at once; the rest
# streams one word per llm_token_ms.
FIRST_DELTA = "Sure, here is the answer you asked for. It"
REST_WORDS = " comes in a second sentence that streams one word at a time.".split(" ")[1:]


@dataclass(frozen=True)
class Schedule:
    speech_s: float = 0.96
    cycle_s: float = 4.0
    warmup_s: float = 4.0  # turns ending before this are not counted

    def cycle_frames(self) -> int:
        return round(self.cycle_s * 1000 / FRAME_MS)

    def speech_frames(self) -> int:
        return round(self.speech_s * 1000 / FRAME_MS)


def phase_frames(session_index: int, schedule: Schedule) -> int:
    """Spread sessions over the cycle in 160 ms steps, so turns do not all line up."""
    steps = schedule.cycle_frames() // 8
    return (session_index * 37 % steps) * 8


def speech_frame() -> bytes:
    t = np.arange(FRAME_SAMPLES) / IN_RATE_HZ
    return (TONE_AMPLITUDE * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes()


SILENCE_FRAME = bytes(2 * FRAME_SAMPLES)


def is_speech(samples: np.ndarray) -> bool:
    as_float = samples.astype(np.float64)
    return bool(as_float.size) and float(np.sqrt(np.mean(as_float * as_float))) > SPEECH_RMS


def tone_audio(ms: float, rate: int = OUT_RATE_HZ) -> bytes:
    """Bot audio: a quiet 440 Hz tone, PCM16."""
    t = np.arange(int(rate * ms / 1000)) / rate
    return (BOT_TONE_AMPLITUDE * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
