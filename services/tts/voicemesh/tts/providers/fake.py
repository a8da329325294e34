"""A scripted TTS provider (see voicemesh.runtime.fakes for the script): each sentence is a
440 Hz tone at 24 kHz, as long as its text asks (or a fixed length), in fixed-size chunks after a
fixed first-audio delay. The servicer splits sentences, resamples, encodes and numbers chunks."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from voicemesh.runtime.fakes import FakeScript, tone_pcm16
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.tts.providers.base import SynthesisRequest, TtsProvider

VOICES = ["tone"]


class FakeTtsProvider(TtsProvider):
    name = "fake"
    sample_rate_hz = 24000

    def __init__(self, script: FakeScript | None = None):
        self.script = script or FakeScript.load()
        self._chunks: dict[int, list[bytes]] = {}  # audio length (samples) -> its chunks
        self.calls = self.cancelled = 0

    async def load(self) -> None:
        pass

    def chunks(self, text: str) -> list[bytes]:
        script = self.script
        ms = script.tts_sentence_ms or script.ms_per_char * len(text)
        samples = int(self.sample_rate_hz * ms / 1000)
        if samples not in self._chunks:
            audio = tone_pcm16(ms, self.sample_rate_hz, script.tone_amplitude)
            step = 2 * self.sample_rate_hz * script.tts_chunk_ms // 1000
            self._chunks[samples] = [audio[i : i + step] for i in range(0, len(audio), step)]
            if len(self._chunks) > 256:
                self._chunks.pop(next(iter(self._chunks)))
        return self._chunks[samples]

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[bytes]:
        self.calls += 1
        try:
            await asyncio.sleep(self.script.tts_first_audio_ms / 1000)
            for chunk in self.chunks(request.text):
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    def voices(self) -> list[str]:
        return VOICES

    def info(self) -> ProviderInfo:
        details = {"tts_calls": str(self.calls), "tts_cancelled": str(self.cancelled), **self.script.details}
        return ProviderInfo(provider="fake", model="scripted", sample_rates_hz=(self.sample_rate_hz,), details=details)
