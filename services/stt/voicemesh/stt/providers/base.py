"""The STT provider interface.

Shaped after streaming recognizers (Riva StreamingRecognize, AWS Transcribe streaming,
Azure push streams): audio is pushed continuously, results are pulled from an async
iterator, and the caller marks turn starts and asks for a final result with `finalize()`.
"""
from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from voicemesh.runtime.provider import Provider


@dataclass(frozen=True)
class SttStreamConfig:
    sample_rate_hz: int = 16000  # audio handed to push_audio is PCM16 mono at this rate
    language: str = ""  # BCP-47; empty means the provider default
    interim_results: bool = True
    pause_transcripts: bool = False  # emit a transcript at each pause (see SttTranscript.at_pause)
    session_id: str = ""  # the caller's session, for providers that key state or logs by it


@dataclass(frozen=True)
class Word:
    text: str
    start_ms: int
    end_ms: int
    confidence: float = 0.0


@dataclass(frozen=True)
class SttTranscript:
    text: str
    is_final: bool
    stability: float = 0.0  # 0..1, for interim results
    confidence: float = 0.0
    language: str = ""
    start_ms: int = 0  # stream offsets of the utterance
    end_ms: int = 0
    words: tuple[Word, ...] = field(default_factory=tuple)
    turn_id: str = ""
    at_pause: bool = False  # interim decoded at a pause: the final will match unless speech resumes


@dataclass(frozen=True)
class SttEndOfUtterance:
    offset_ms: int
    turn_id: str = ""


SttResult = SttTranscript | SttEndOfUtterance


class SttStream(abc.ABC):
    @abc.abstractmethod
    async def push_audio(self, pcm16: bytes) -> None:
        """Append PCM16 mono audio at the configured rate. Must return quickly."""

    @abc.abstractmethod
    async def turn_start(self, turn_id: str, audio_offset_ms: int) -> None:
        """The user started speaking at `audio_offset_ms` of the stream (a new utterance)."""

    @abc.abstractmethod
    async def finalize(self) -> None:
        """Produce the final transcript of the current utterance now, then end of utterance."""

    @abc.abstractmethod
    def results(self) -> AsyncIterator[SttResult]:
        """Transcripts and end-of-utterance markers, in order, until close()."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop recognition; results() ends after what is pending."""

    async def abort(self) -> None:
        """The caller has gone and will read nothing more: drop pending work, end results()."""
        await self.close()


class SttProvider(Provider):
    @abc.abstractmethod
    def open_stream(self, config: SttStreamConfig) -> SttStream: ...
