"""A session-long SttStream over a remote recognizer, one upstream request per utterance.

Cloud recognizers (Riva, Transcribe, Azure, Deepgram) stream results for the audio they are
sent and give their last final once the audio ends. So each utterance (turn_start ..
finalize) gets its own upstream request: opened at turn_start with a short preroll (the VAD
reports speech starts late), fed while the user speaks, and ended at finalize, which makes
the provider send its final at once instead of after its own endpointing silence. Nothing
is sent between utterances, so silence is never billed, and cancelling the stream closes
the open requests, so barge-in and hang-up stop the provider's work.

The provider-specific part is an `UpstreamRecognition`: send audio, end it, read its
results (times relative to the first sample sent), cancel it. This module turns those into
the SttStream contract: interims as they come (each provider final of the utterance too, as
a stable interim), then exactly one final per finalize with all the utterance's words, then
the end of utterance, in finalize order.
"""
from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from voicemesh.runtime.errors import Unavailable
from voicemesh.runtime.upstream import open_with_retry
from voicemesh.stt.providers.base import SttEndOfUtterance, SttResult, SttStream, SttStreamConfig, SttTranscript, Word

PREROLL_MS = 250  # audio before turn_start sent too: VAD reports speech starts ~100-250 ms late
HISTORY_MS = 30_000  # audio kept for a finalize without turn_start (the whole segment, at most this)
_END = object()


class UpstreamRecognition(abc.ABC):
    """One upstream recognition request (one utterance) of a remote provider."""

    @abc.abstractmethod
    async def send(self, pcm16: bytes) -> None:
        """Send PCM16 mono audio at the stream's rate."""

    @abc.abstractmethod
    async def end(self) -> None:
        """No more audio: the provider sends its last results, then results() ends."""

    @abc.abstractmethod
    def results(self) -> AsyncIterator[SttTranscript]:
        """Interim and final transcripts, times relative to the first sample sent."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop now: close the request so the provider stops working (and billing)."""


Opener = Callable[[SttStreamConfig], Awaitable[UpstreamRecognition]]


class _Utterance:
    def __init__(self, turn_id: str, start_ms: int):
        self.turn_id = turn_id
        self.start_ms = start_ms  # stream time of the first sample sent upstream
        self.pending = bytearray()  # audio not yet sent; what queues during a send goes in one message
        self.ended = False  # finalize came: send what is pending, then end the request
        self.wake = asyncio.Event()
        self.out: asyncio.Queue = asyncio.Queue()  # SttResult, an exception, then _END
        self.end_ms = 0
        self.task: asyncio.Task | None = None


class UtteranceSttStream(SttStream):
    def __init__(self, config: SttStreamConfig, open_upstream: Opener, what: str, preroll_ms: int = PREROLL_MS):
        self._config = config
        self._open = open_upstream
        self._what = what
        self._bytes_per_ms = config.sample_rate_hz * 2 // 1000
        self._preroll_ms = preroll_ms
        self._history = bytearray()  # the last HISTORY_MS of audio
        self._history_start_ms = 0
        self._total_ms = 0.0
        self._segment_start_ms = 0  # where audio not yet recognised begins
        self._current: _Utterance | None = None
        self._turns_marked = False  # the caller sends turn starts (the orchestrator does)
        self._order: asyncio.Queue = asyncio.Queue()  # utterances in start (= finalize) order, then _END
        self._utterances: set[_Utterance] = set()
        self._closed = False

    # --- input -------------------------------------------------------------------------
    async def push_audio(self, pcm16: bytes) -> None:
        if self._closed:
            return
        self._history += pcm16
        self._total_ms += len(pcm16) / self._bytes_per_ms
        excess = len(self._history) - HISTORY_MS * self._bytes_per_ms
        if excess > 0:
            excess += -excess % self._bytes_per_ms  # whole ms, so _history_start_ms stays exact
            del self._history[:excess]
            self._history_start_ms += excess // self._bytes_per_ms
        if self._current is not None:
            self._current.pending += pcm16
            self._current.wake.set()

    async def turn_start(self, turn_id: str, audio_offset_ms: int) -> None:
        if self._closed:
            return
        if self._current is not None:  # the user resumed: the same request goes on
            self._current.turn_id = turn_id or self._current.turn_id
            return
        self._turns_marked = True
        self._start(turn_id, max(audio_offset_ms - self._preroll_ms, self._segment_start_ms))

    async def finalize(self) -> None:
        if self._closed:
            return
        if self._current is None and (self._turns_marked or self._total_ms - self._segment_start_ms < 1):
            # The caller marks its turns and none is open, so what came since the last finalize is
            # not speech (the servicer's finalize at the end of the requests, say), or nothing
            # came at all: an empty final, and no upstream request billed for it.
            self._answer_empty()
            return
        if self._current is None:  # a caller that never marks turns: recognise the whole segment
            self._start("", self._segment_start_ms)
        utterance, self._current = self._current, None
        utterance.end_ms = int(self._total_ms)
        utterance.ended = True
        utterance.wake.set()
        self._segment_start_ms = utterance.end_ms

    def _answer_empty(self) -> None:
        utterance = _Utterance("", int(self._total_ms))
        utterance.end_ms = utterance.start_ms
        for item in (_final([], utterance), SttEndOfUtterance(offset_ms=utterance.end_ms), _END):
            utterance.out.put_nowait(item)
        self._segment_start_ms = utterance.end_ms
        self._order.put_nowait(utterance)

    def _start(self, turn_id: str, start_ms: int) -> None:
        start_ms = max(start_ms, self._history_start_ms)
        utterance = _Utterance(turn_id, start_ms)
        first = (start_ms - self._history_start_ms) * self._bytes_per_ms
        utterance.pending += self._history[first:]
        utterance.wake.set()
        utterance.task = asyncio.create_task(self._run(utterance))
        self._utterances.add(utterance)
        self._current = utterance
        # Read from now on, so its interims go out while the user speaks. Utterances never overlap
        # (the next starts after this one's finalize), so start order is finalize order.
        self._order.put_nowait(utterance)

    # --- one upstream request ------------------------------------------------------------
    async def _run(self, utterance: _Utterance) -> None:
        upstream: UpstreamRecognition | None = None
        sender: asyncio.Task | None = None
        finished = False
        try:
            upstream = await open_with_retry(lambda: self._open(self._config), self._what)
            sender = asyncio.create_task(self._send(utterance, upstream))
            finals: list[SttTranscript] = []
            async for result in upstream.results():
                shifted = _shift(result, utterance.start_ms, utterance.turn_id)
                if result.is_final:
                    finals.append(shifted)
                    shifted = replace(shifted, is_final=False, stability=1.0, text=_joined(finals))
                elif finals:  # an interim covers the audio after the last final: the text so far is both
                    shifted = replace(shifted, text=_joined([*finals, shifted]), start_ms=finals[0].start_ms)
                if self._config.interim_results and shifted.text:
                    utterance.out.put_nowait(shifted)
            if not utterance.ended:  # the request closed while the user still spoke
                if sender.done():
                    await sender  # a failed send closed it: that failure is the reason
                raise Unavailable(f"{self._what}: the provider ended the recognition in the middle of an utterance; "
                                  "the audio after that was not recognised")
            await sender
            finished = True
            utterance.out.put_nowait(_final(finals, utterance))
            utterance.out.put_nowait(SttEndOfUtterance(offset_ms=utterance.end_ms, turn_id=utterance.turn_id))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - ends the stream with it (see results())
            utterance.out.put_nowait(err)
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
            if upstream is not None and not finished:  # cancelled or failed: close the request now
                with contextlib.suppress(Exception):
                    await asyncio.shield(upstream.cancel())
            utterance.out.put_nowait(_END)

    @staticmethod
    async def _send(utterance: _Utterance, upstream: UpstreamRecognition) -> None:
        try:
            await UtteranceSttStream._send_all(utterance, upstream)
        except Exception:
            with contextlib.suppress(Exception):  # so that results() ends and _run reports this error
                await upstream.cancel()
            raise

    @staticmethod
    async def _send_all(utterance: _Utterance, upstream: UpstreamRecognition) -> None:
        while True:
            if utterance.pending:  # all that queued while the last send was in flight, in one message
                chunk = bytes(utterance.pending)
                utterance.pending.clear()
                await upstream.send(chunk)
            elif utterance.ended:
                await upstream.end()
                return
            else:
                utterance.wake.clear()
                await utterance.wake.wait()

    # --- output --------------------------------------------------------------------------
    async def results(self) -> AsyncIterator[SttResult]:
        while (utterance := await self._order.get()) is not _END:
            try:
                while (item := await utterance.out.get()) is not _END:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                self._utterances.discard(utterance)

    async def close(self) -> None:
        """No more input: finalized utterances finish; one never finalized is dropped."""
        if self._closed:
            return
        self._closed = True
        if self._current is not None:
            await _cancel(self._current)
            self._utterances.discard(self._current)
            self._current = None
        self._order.put_nowait(_END)

    async def abort(self) -> None:
        """The caller has gone: every open request is cancelled now."""
        self._closed = True
        for utterance in list(self._utterances):
            await _cancel(utterance)
        self._utterances.clear()
        self._current = None
        self._order.put_nowait(_END)


async def _cancel(utterance: _Utterance) -> None:
    if utterance.task is not None and not utterance.task.done():
        utterance.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await utterance.task
    utterance.out.put_nowait(_END)  # a task cancelled before it ever ran has not put its own


def _joined(finals: list[SttTranscript]) -> str:
    return " ".join(part.text.strip() for part in finals if part.text.strip())


def _shift(result: SttTranscript, offset_ms: int, turn_id: str) -> SttTranscript:
    words = tuple(Word(w.text, w.start_ms + offset_ms, w.end_ms + offset_ms, w.confidence) for w in result.words)
    return replace(result, start_ms=result.start_ms + offset_ms, end_ms=result.end_ms + offset_ms, words=words,
                   turn_id=turn_id)


def _final(finals: list[SttTranscript], utterance: _Utterance) -> SttTranscript:
    """One final for the utterance: every provider final of it joined, all their words."""
    words = tuple(word for part in finals for word in part.words)
    confidences = [part.confidence for part in finals if part.confidence]
    return SttTranscript(
        text=_joined(finals), is_final=True, confidence=sum(confidences) / len(confidences) if confidences else 0.0,
        language=next((part.language for part in finals if part.language), ""),
        start_ms=finals[0].start_ms if finals else utterance.start_ms,
        end_ms=finals[-1].end_ms if finals else utterance.end_ms, words=words, turn_id=utterance.turn_id,
    )
