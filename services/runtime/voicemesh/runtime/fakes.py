"""The script of the `fake` providers (`--provider fake`, one per service kind).

A fake is a provider like any other: the real servicer runs in front of it, so validation,
health, Info, DetectMany and tracing are the real service's. Only the engine is scripted:

- VAD (`voicemesh.vad.providers.fake`): a 512-sample window (32 ms, as Silero's) has speech
  probability 1 when its RMS is above `speech_rms`, else 0; the real segmenter decides.
- STT (`voicemesh.stt.providers.fake`): the n-th final is `transcripts[n-1]`, else
  `fallback` with `{n}` replaced; after each turn start an interim every `interim_every_ms`
  of audio, with `words_per_second` words per second of loud audio so far ("w1 w2 ...";
  0 turns interims off); each final comes `stt_final_ms` after Finalize. Sessions whose id
  starts with "hold-" hold their finals until released over the control RPC
  (`/fakes.Control/Release`, see the STT fake), "hold-cough-" also empties every final after
  the first, "silent-" empties them all.
- LLM (`voicemesh.llm.providers.fake`): echoes "You said: <last user message>." (or `reply`
  when set), the first `llm_first_delta_words` words `llm_first_token_ms` after the request,
  then a word every `llm_token_ms`; "say nothing" gets an empty reply, "only emoji" emoji and
  markdown alone, "long story" 30 sentences, "what did you say" the previous reply, "count
  messages" the message count, and with tools declared "weather in X and Y" calls get_weather
  once per city, then says "The tools said: <results>.".
- TTS (`voicemesh.tts.providers.fake`): each sentence becomes a 440 Hz tone, `ms_per_char`
  per character (or `tts_sentence_ms` flat when set), in `tts_chunk_ms` chunks at 24 kHz,
  after `tts_first_audio_ms`.

Where it comes from: VOICEMESH_FAKE_SCRIPT is a JSON object of the fields below, inline
(starting with "{") or the path of a JSON file; VOICEMESH_FAKE_TRANSCRIPTS (comma-separated)
overrides `transcripts`. Unknown fields are an error, so a typo never passes silently.
`FakeScript.to_env()` writes the variables for a process to be started.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

SCRIPT_ENV = "VOICEMESH_FAKE_SCRIPT"
TRANSCRIPTS_ENV = "VOICEMESH_FAKE_TRANSCRIPTS"
HOLD_PREFIX, COUGH_PREFIX, SILENT_PREFIX = "hold-", "hold-cough-", "silent-"
CONTROL_SERVICE, RELEASE = "fakes.Control", "Release"
RELEASE_METHOD = f"/{CONTROL_SERVICE}/{RELEASE}"  # request: the session id, UTF-8; reply: empty


@dataclass(frozen=True)
class FakeScript:
    speech_rms: float = 1000.0  # VAD and STT: louder than this (int16 RMS) is speech
    transcripts: tuple[str, ...] = ()
    fallback: str = "utterance {n}"  # the final of the n-th utterance past the scripted ones
    words_per_second: int = 5  # interim words per second of loud audio; 0: no interims
    interim_every_ms: int = 200
    stt_final_ms: float = 0.0  # Finalize -> final transcript
    reply: str = ""  # a fixed LLM reply; empty: the echo rules of the module docstring
    llm_first_token_ms: float = 10.0  # request -> first delta
    llm_first_delta_words: int = 1  # words in the first delta
    llm_token_ms: float = 10.0  # then one word per this
    llm_queued_ms: float = 0.0  # before that, each request waits this long for a slot (a busy model) ...
    llm_queued_every_ms: float = 500.0  # ... saying Queued this often, as the llama.cpp provider does
    tts_first_audio_ms: float = 20.0  # sentence -> first audio
    ms_per_char: float = 20.0  # audio per character of the sentence...
    tts_sentence_ms: float = 0.0  # ...unless this is set: every sentence this long
    tts_chunk_ms: int = 40
    tone_amplitude: int = 8000
    details: dict[str, str] = field(default_factory=dict)  # extra Info details (a label, say)

    @classmethod
    def from_dict(cls, values: dict) -> "FakeScript":
        known = {spec.name for spec in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{SCRIPT_ENV}: unknown fields {unknown}; known: {sorted(known)}")
        if "transcripts" in values:
            values = {**values, "transcripts": tuple(values["transcripts"])}
        return cls(**values)

    @classmethod
    def load(cls, environ=os.environ) -> "FakeScript":
        raw = environ.get(SCRIPT_ENV, "").strip()
        values = {}
        if raw:
            values = json.loads(raw if raw.startswith("{") else Path(raw).read_text())
        if environ.get(TRANSCRIPTS_ENV):
            values["transcripts"] = [t for t in environ[TRANSCRIPTS_ENV].split(",") if t]
        return cls.from_dict(values)

    def to_env(self) -> dict[str, str]:
        """The environment that makes a fake provider's process run this script."""
        return {SCRIPT_ENV: json.dumps(asdict(self)), TRANSCRIPTS_ENV: ""}

    def final_text(self, index: int) -> str:
        """The final transcript of the utterance number `index` (0-based)."""
        return self.transcripts[index] if index < len(self.transcripts) else self.fallback.replace("{n}", str(index + 1))


def is_loud(samples: np.ndarray, speech_rms: float) -> bool:
    """Whether int16 samples are speech to the fakes: RMS above `speech_rms`."""
    if not samples.size:
        return False
    as_float = samples.astype(np.float32)
    return float(np.dot(as_float, as_float)) > speech_rms * speech_rms * samples.size


def tone_pcm16(ms: float, rate_hz: int, amplitude: int = 8000, hz: float = 440.0) -> bytes:
    """A sine tone, PCM16 little-endian: the fake TTS's voice."""
    t = np.arange(int(rate_hz * ms / 1000)) / rate_hz
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()
