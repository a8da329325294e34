"""The TTS provider interface: one call synthesizes one piece of text (a sentence).

Sentence splitting and segment bookkeeping live in the servicer, so a provider maps onto
one request of a streaming or one-shot API (Riva synthesize_online, Polly, Azure).
"""
from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass

from voicemesh.runtime.provider import Provider


@dataclass(frozen=True)
class SynthesisRequest:
    text: str
    voice: str = ""  # empty: the provider's default voice
    language: str = ""
    speed: float = 1.0


@dataclass(frozen=True)
class WordMark:
    """A word boundary, from providers that report them (Azure, ElevenLabs, Cartesia, Polly
    speech marks): the word and where it starts, in ms from this synthesis' first sample."""

    text: str
    start_ms: float


class TtsProvider(Provider):
    sample_rate_hz: int  # native output rate; the servicer resamples to what the caller asked

    @abc.abstractmethod
    def synthesize(self, request: SynthesisRequest) -> AsyncIterator[bytes | WordMark]:
        """PCM16 mono chunks at `sample_rate_hz`, first chunk as early as possible; WordMarks
        between them where the provider gives word boundaries."""

    def voices(self) -> list[str]:
        """Voices this provider can speak with."""
        return []
