"""UtteranceSttStream (utterances.py) over a scripted UpstreamRecognition: one upstream request
per utterance, what it is sent, and the SttStream results it turns the upstream's into.

In-process and fast: the scripted upstream records what it was sent and answers what the test
puts in its queue; nothing waits on time, only on events with a deadline.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from voicemesh.runtime.errors import InvalidInput, Unavailable
from voicemesh.stt.providers.base import SttEndOfUtterance, SttStreamConfig, SttTranscript, Word
from voicemesh.stt.providers.utterances import HISTORY_MS, PREROLL_MS, UpstreamRecognition, UtteranceSttStream

WAIT_S = 10  # only a bound on a failing test
BYTES_PER_MS = 32  # PCM16 mono, 16 kHz
_DONE = object()


def ramp(start_ms: int, ms: int) -> bytes:
    """Audio whose every sample says where it is in the stream (sample index mod 2**15)."""
    first = start_ms * 16
    return (np.arange(first, first + ms * 16) % 32768).astype("<i2").tobytes()


def position_ms(pcm: bytes) -> float:
    return int(np.frombuffer(pcm[:2], "<i2")[0]) / 16


class Scripted(UpstreamRecognition):
    def __init__(self) -> None:
        self.sent = bytearray()
        self.ended = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.answers: asyncio.Queue = asyncio.Queue()  # SttTranscript, an exception, or _DONE
        self.fail_send: Exception | None = None
        self.sent_after_end = 0

    async def send(self, pcm16: bytes) -> None:
        if self.fail_send is not None:
            raise self.fail_send
        if self.ended.is_set():
            self.sent_after_end += len(pcm16)
        self.sent += pcm16

    async def end(self) -> None:
        self.ended.set()

    async def results(self):
        while (item := await self.answers.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def cancel(self) -> None:
        self.cancelled.set()
        self.answers.put_nowait(_DONE)

    def answer(self, *items) -> None:
        for item in items:
            self.answers.put_nowait(item)


class Opener:
    def __init__(self, error: Exception | None = None) -> None:
        self.upstreams: list[Scripted] = []
        self.error = error
        self._opened = asyncio.Condition()

    async def __call__(self, config: SttStreamConfig) -> UpstreamRecognition:
        if self.error is not None:
            raise self.error
        upstream = Scripted()
        async with self._opened:
            self.upstreams.append(upstream)
            self._opened.notify_all()
        return upstream

    async def nth(self, index: int) -> Scripted:
        async with self._opened:
            await asyncio.wait_for(self._opened.wait_for(lambda: len(self.upstreams) > index), WAIT_S)
        return self.upstreams[index]


def final(text: str, start_ms: int, end_ms: int, confidence: float = 0.8) -> SttTranscript:
    parts = text.split()
    step = (end_ms - start_ms) // len(parts)
    words = tuple(Word(w, start_ms + i * step, start_ms + (i + 1) * step, confidence) for i, w in enumerate(parts))
    return SttTranscript(text, True, confidence=confidence, start_ms=start_ms, end_ms=end_ms, words=words)


def interim(text: str, start_ms: int = 0, end_ms: int = 0) -> SttTranscript:
    return SttTranscript(text, False, start_ms=start_ms, end_ms=end_ms)


async def until(predicate, what: str) -> None:
    async def poll():
        while not predicate():
            await asyncio.sleep(0.001)  # a poll of a state under a deadline; yields the core
    try:
        await asyncio.wait_for(poll(), WAIT_S)
    except asyncio.TimeoutError:
        raise AssertionError(f"waited {WAIT_S} s for {what}") from None


async def collect(stream: UtteranceSttStream) -> list:
    return [item async for item in stream.results()]


@pytest.fixture
def opener() -> Opener:
    return Opener()


def stream_of(opener: Opener, interim_results: bool = True) -> UtteranceSttStream:
    return UtteranceSttStream(SttStreamConfig(interim_results=interim_results), opener, "test")


async def test_preroll_from_turn_start_and_times_shifted(opener):
    stream = stream_of(opener)
    await stream.push_audio(ramp(0, 1000))
    await stream.turn_start("t1", 600)
    upstream = await opener.nth(0)
    await until(lambda: len(upstream.sent) >= (1000 - 600 + PREROLL_MS) * BYTES_PER_MS, "the preroll")
    assert position_ms(upstream.sent) == 600 - PREROLL_MS
    assert bytes(upstream.sent) == ramp(600 - PREROLL_MS, 1000 - 600 + PREROLL_MS)
    await stream.push_audio(ramp(1000, 200))  # audio pushed while the utterance is open goes on
    await stream.finalize()
    await upstream.ended.wait()
    assert bytes(upstream.sent) == ramp(350, 850) and upstream.sent_after_end == 0
    upstream.answer(final("hello there", 100, 500), _DONE)
    await stream.close()
    results = await collect(stream)
    finals = [r for r in results if isinstance(r, SttTranscript) and r.is_final]
    assert len(finals) == 1
    assert (finals[0].start_ms, finals[0].end_ms) == (350 + 100, 350 + 500)  # relative to the first sample sent
    assert [w.start_ms for w in finals[0].words] == [450, 650] and finals[0].turn_id == "t1"
    assert results[-1] == SttEndOfUtterance(offset_ms=1200, turn_id="t1")


async def test_one_final_per_finalize_joins_provider_finals(opener):
    stream = stream_of(opener)
    await stream.turn_start("t1", 0)
    await stream.push_audio(ramp(0, 2000))
    upstream = await opener.nth(0)
    upstream.answer(interim("hello"), final("hello there", 0, 800, 0.6), interim("how", 900, 1100),
                    final("how are you", 900, 1900, 1.0))
    await stream.finalize()
    await upstream.ended.wait()
    upstream.answer(_DONE)
    await stream.close()
    results = await collect(stream)
    transcripts = [r for r in results if isinstance(r, SttTranscript)]
    assert [(t.text, t.is_final) for t in transcripts] == [
        ("hello", False), ("hello there", False), ("hello there how", False), ("hello there how are you", False),
        ("hello there how are you", True)]
    assert transcripts[1].stability == 1.0  # a provider final is a stable interim
    last = transcripts[-1]
    assert [w.text for w in last.words] == ["hello", "there", "how", "are", "you"]
    assert last.confidence == pytest.approx(0.8) and (last.start_ms, last.end_ms) == (0, 1900)
    assert isinstance(results[-1], SttEndOfUtterance) and len(opener.upstreams) == 1


async def test_finals_come_in_finalize_order(opener):
    stream = stream_of(opener, interim_results=False)
    reader = asyncio.create_task(collect(stream))
    await stream.turn_start("a", 0)
    await stream.push_audio(ramp(0, 500))
    await stream.finalize()
    await stream.turn_start("b", 1000)
    await stream.push_audio(ramp(500, 1000))
    await stream.finalize()
    first, second = await opener.nth(0), await opener.nth(1)
    await second.ended.wait()
    second.answer(final("second", 0, 300), _DONE)  # the later utterance answers first
    await until(lambda: second.answers.empty(), "the second utterance's answer to be read")
    assert not reader.done()
    first.answer(final("first", 0, 300), _DONE)
    await stream.close()
    results = await asyncio.wait_for(reader, WAIT_S)
    assert [(type(r).__name__, r.turn_id) for r in results] == [
        ("SttTranscript", "a"), ("SttEndOfUtterance", "a"), ("SttTranscript", "b"), ("SttEndOfUtterance", "b")]
    assert [r.text for r in results if isinstance(r, SttTranscript)] == ["first", "second"]


async def test_finalize_without_turn_start_recognises_the_segment(opener):
    stream = stream_of(opener)
    await stream.push_audio(ramp(0, 400))
    await stream.finalize()  # no turn_start: the whole segment so far
    first = await opener.nth(0)
    await first.ended.wait()
    assert bytes(first.sent) == ramp(0, 400)
    first.answer(final("one", 0, 400), _DONE)
    await stream.push_audio(ramp(400, 300))
    await stream.finalize()  # the next segment starts where the last one ended
    second = await opener.nth(1)
    await second.ended.wait()
    assert bytes(second.sent) == ramp(400, 300)
    second.answer(_DONE)  # the provider heard nothing: an empty final still ends the utterance
    await stream.close()
    results = await collect(stream)
    assert [(r.text, r.turn_id) for r in results if isinstance(r, SttTranscript) and r.is_final] == [("one", ""), ("", "")]
    assert [r.offset_ms for r in results if isinstance(r, SttEndOfUtterance)] == [400, 700]


async def test_a_finalize_outside_any_turn_bills_no_silence(opener):
    """A caller that marks turns (the orchestrator) and finalizes with none open (the servicer's
    finalize at the end of the requests): an empty final at once, no upstream request."""
    stream = stream_of(opener)
    await stream.push_audio(ramp(0, 200))
    await stream.turn_start("t1", 100)
    first = await opener.nth(0)
    await stream.finalize()
    await first.ended.wait()
    first.answer(final("hello", 0, 200), _DONE)
    await stream.push_audio(ramp(200, 500))  # silence after the turn
    await stream.finalize()
    await stream.close()
    results = await collect(stream)
    assert len(opener.upstreams) == 1, "a request was opened for the silence after the last turn"
    assert [(r.text, r.turn_id) for r in results if isinstance(r, SttTranscript) and r.is_final] == [("hello", "t1"), ("", "")]
    assert [r.offset_ms for r in results if isinstance(r, SttEndOfUtterance)] == [200, 700]


async def test_close_drops_an_unfinalized_utterance(opener):
    stream = stream_of(opener)
    await stream.turn_start("t1", 0)
    await stream.push_audio(ramp(0, 300))
    upstream = await opener.nth(0)
    upstream.answer(interim("partial"))
    await until(lambda: upstream.answers.empty(), "the interim to be read")
    await stream.close()
    await asyncio.wait_for(upstream.cancelled.wait(), WAIT_S)
    results = await asyncio.wait_for(collect(stream), WAIT_S)
    assert [(r.text, r.is_final) for r in results] == [("partial", False)]  # no final, no end of utterance
    assert not upstream.ended.is_set()


async def test_interims_go_out_before_finalize(opener):
    stream = stream_of(opener)
    results = stream.results()
    await stream.turn_start("t1", 0)
    await stream.push_audio(ramp(0, 300))
    upstream = await opener.nth(0)
    upstream.answer(interim("hel", 0, 300))
    first = await asyncio.wait_for(anext(results), WAIT_S)  # while the user still speaks
    assert (first.text, first.is_final, first.turn_id) == ("hel", False, "t1")
    await stream.abort()
    assert [item async for item in results] == []


async def test_close_right_after_turn_start_ends_results(opener):
    stream = stream_of(opener)
    await stream.turn_start("t1", 0)  # its task has not run yet
    await stream.close()
    assert await asyncio.wait_for(collect(stream), WAIT_S) == []


async def test_abort_cancels_every_open_request(opener):
    stream = stream_of(opener)
    await stream.turn_start("a", 0)
    await stream.push_audio(ramp(0, 300))
    await stream.finalize()  # finalized, not answered yet
    await stream.turn_start("b", 400)
    await stream.push_audio(ramp(300, 300))  # open
    first, second = await opener.nth(0), await opener.nth(1)
    await stream.abort()
    await asyncio.wait_for(first.cancelled.wait(), WAIT_S)
    await asyncio.wait_for(second.cancelled.wait(), WAIT_S)
    assert await asyncio.wait_for(collect(stream), WAIT_S) == []


async def test_an_open_error_ends_results_with_it():
    opener = Opener(error=InvalidInput("test: language 'xx' is not supported"))
    stream = stream_of(opener)
    await stream.turn_start("t1", 0)
    await stream.push_audio(ramp(0, 300))
    await stream.finalize()
    with pytest.raises(InvalidInput, match="language 'xx'"):
        await asyncio.wait_for(collect(stream), WAIT_S)
    await stream.abort()


async def test_an_upstream_error_mid_stream_ends_results_and_cancels(opener):
    stream = stream_of(opener)
    await stream.turn_start("t1", 0)
    await stream.push_audio(ramp(0, 300))
    upstream = await opener.nth(0)
    upstream.answer(interim("par"), Unavailable("test: the stream timed out"))
    await stream.finalize()
    seen = []
    with pytest.raises(Unavailable, match="timed out"):
        async for item in stream.results():
            seen.append(item)
    assert [r.text for r in seen] == ["par"]
    await asyncio.wait_for(upstream.cancelled.wait(), WAIT_S)  # a failed request is closed too
    await stream.abort()


async def test_a_send_failure_ends_the_utterance_with_it(opener):
    stream = stream_of(opener)
    await stream.turn_start("t1", 0)
    upstream = await opener.nth(0)
    upstream.fail_send = Unavailable("test: the connection closed while audio was being sent")
    await stream.push_audio(ramp(0, 300))
    await asyncio.wait_for(upstream.cancelled.wait(), WAIT_S)  # the request is closed, so its results end
    await stream.finalize()
    with pytest.raises(Unavailable, match="while audio was being sent"):
        await asyncio.wait_for(collect(stream), WAIT_S)
    await stream.abort()


async def test_a_request_the_provider_ends_early_is_an_error_not_lost_audio(opener):
    stream = stream_of(opener)
    await stream.turn_start("t1", 0)
    upstream = await opener.nth(0)
    await stream.push_audio(ramp(0, 300))
    upstream.answer(interim("so far"), _DONE)  # the provider closes the request mid-utterance
    with pytest.raises(Unavailable, match="ended the recognition in the middle of an utterance"):
        await asyncio.wait_for(collect(stream), WAIT_S)
    await stream.abort()


async def test_nothing_is_sent_between_utterances(opener):
    stream = stream_of(opener, interim_results=False)
    await stream.turn_start("a", 0)
    await stream.push_audio(ramp(0, 500))
    await stream.finalize()
    first = await opener.nth(0)
    await first.ended.wait()
    for index in range(10):  # 2 s between the utterances: nobody is sent any of it
        await stream.push_audio(ramp(500 + index * 200, 200))
    assert len(opener.upstreams) == 1 and len(first.sent) == 500 * BYTES_PER_MS and first.sent_after_end == 0
    await stream.turn_start("b", 2400)
    second = await opener.nth(1)
    await until(lambda: len(second.sent) == 2500 * BYTES_PER_MS - (2400 - PREROLL_MS) * BYTES_PER_MS, "the preroll")
    assert position_ms(second.sent) == (2400 - PREROLL_MS) % 2048  # only the preroll of the pause (the ramp wraps)
    first.answer(_DONE)
    await stream.abort()


async def test_history_keeps_exact_times_with_odd_chunks(opener):
    """Past HISTORY_MS the oldest audio is dropped; with chunks that are not whole milliseconds the
    stream's idea of where its history starts must not drift."""
    stream = stream_of(opener)
    total = HISTORY_MS + 5000
    pcm = ramp(0, total)
    step = 37 * 2  # 37 samples: 2.3125 ms per chunk
    for begin in range(0, len(pcm), step):
        await stream.push_audio(pcm[begin:begin + step])
    await stream.turn_start("t1", total - 1000)
    upstream = await opener.nth(0)
    await until(lambda: len(upstream.sent) >= (1000 + PREROLL_MS) * BYTES_PER_MS, "the preroll")
    assert position_ms(upstream.sent) == (total - 1000 - PREROLL_MS) % 2048  # the ramp wraps every 2048 ms
    await stream.abort()
