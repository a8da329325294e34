"""A scripted VAD provider: speech is loudness (see voicemesh.runtime.fakes).

Each 512-sample window (32 ms at 16 kHz, Silero's window, which the servicer's segmenter
counts in) scores probability 1.0 when its RMS is above the script's `speech_rms`, else 0.0.
The real servicer and segmenter do the rest, so start/stop timing, validation, DetectMany and
Smart Turn (when the process has the model) are the real service's.
"""
from __future__ import annotations

import numpy as np

from voicemesh.runtime.fakes import FakeScript
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.vad.providers.base import VadFrameResult, VadProvider, VadStream

WINDOW_SAMPLES = 512


class FakeVadStream(VadStream):
    def __init__(self, speech_rms: float):
        self._threshold = speech_rms * speech_rms * WINDOW_SAMPLES  # sum of squares of a loud window
        self._pending = np.zeros(0, dtype=np.int16)
        self._offset = 0  # stream position (samples) at the end of the last window scored

    async def process(self, samples: np.ndarray) -> list[VadFrameResult]:
        data = np.concatenate((self._pending, samples)) if self._pending.size else samples
        whole = len(data) // WINDOW_SAMPLES
        self._pending = data[whole * WINDOW_SAMPLES :]
        if not whole:
            return []
        windows = data[: whole * WINDOW_SAMPLES].reshape(whole, WINDOW_SAMPLES).astype(np.float32)
        loud = np.einsum("ij,ij->i", windows, windows) > self._threshold
        results = []
        for speech in loud.tolist():
            self._offset += WINDOW_SAMPLES
            results.append(VadFrameResult(self._offset, 1.0 if speech else 0.0))
        return results


class FakeVadProvider(VadProvider):
    name = "fake"

    def __init__(self, script: FakeScript | None = None):
        self.script = script or FakeScript.load()
        self.streams = 0

    async def load(self) -> None:
        pass

    def open_stream(self) -> VadStream:
        self.streams += 1
        return FakeVadStream(self.script.speech_rms)

    def info(self) -> ProviderInfo:
        details = {"streams": str(self.streams), **self.script.details}
        return ProviderInfo(provider="fake", model="scripted", sample_rates_hz=(self.sample_rate_hz,), details=details)
