"""The VAD provider interface: 16 kHz mono PCM16 in, speech probabilities out."""
from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from voicemesh.runtime.provider import Provider


@dataclass(frozen=True)
class VadFrameResult:
    """Speech probability for one analysis window of the stream."""

    end_offset_samples: int  # stream position (16 kHz samples) at the end of the window
    probability: float


class VadStream(abc.ABC):
    """Per-session model state (recurrent state, leftover samples)."""

    @abc.abstractmethod
    async def process(self, samples: np.ndarray) -> list[VadFrameResult]:
        """Feed int16 samples at 16 kHz; returns one result per complete model window."""

    async def close(self) -> None:
        """Drop the per-session state."""


class VadProvider(Provider):
    sample_rate_hz: int = 16000

    @abc.abstractmethod
    def open_stream(self) -> VadStream:
        """A fresh stream with its own state."""
