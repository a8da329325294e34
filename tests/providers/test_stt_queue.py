"""The Whisper decode queue and how streams use it, without the model: a fake decode that runs
on the queue's real worker thread and blocks on a threading.Event the test holds and releases.

Nothing here waits on time: the tests wait for events and futures, and check the order in which
the decodes ran (or that they never ran).
"""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from support import tone
from voicemesh.runtime.config import ServeSettings
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.streams import with_reader
from voicemesh.stt.providers.base import SttEndOfUtterance, SttStreamConfig, SttTranscript
from voicemesh.stt.providers.decode_queue import DecodeQueue
from voicemesh.stt.providers.whisper_stream import WhisperSttStream, _Decoded
from voicemesh.stt.service import SttServicer
from voicemesh.v1 import common_pb2, stt_pb2, stt_pb2_grpc

WAIT_S = 30  # only a bound on a failing test; nothing is timed


class Gate:
    """A decode in the worker thread waits here while the gate is held."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._started = threading.Event()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def pass_through(self) -> None:  # worker thread
        self._started.set()
        assert self._open.wait(WAIT_S), "the test never released the gate"

    async def started(self) -> None:
        """Until a decode has begun (then re-armed for the next one)."""
        assert await asyncio.to_thread(self._started.wait, WAIT_S)
        self._started.clear()


@pytest.fixture
def queue():
    decode_queue = DecodeQueue("test-decode")
    yield decode_queue
    decode_queue.close()


def recording(gate: Gate, held: str, ran: list):
    """A job function: appends its name to `ran` when it runs; the one named `held` waits at the gate."""
    def work(name):
        if name == held:
            gate.pass_through()
        ran.append(name)
        return name
    return work


# -- the queue itself ---------------------------------------------------------------------------

async def test_finals_run_before_queued_interims_in_the_order_asked(queue):
    gate, ran = Gate(), []
    work = recording(gate, "running interim", ran)
    gate.hold()
    jobs = [queue.submit(work, "running interim", final=False, key="a")]
    await gate.started()
    for name, final, key in [("interim b", False, "b"), ("final a1", True, "a"), ("interim c", False, "c"),
                             ("final b", True, "b"), ("final a2", True, "a")]:
        jobs.append(queue.submit(work, name, final=final, key=key))
    gate.release()
    results = await asyncio.gather(*(job.future for job in jobs))
    assert ran == ["running interim", "final a1", "final b", "final a2", "interim b", "interim c"]
    assert results == [job.args[0] for job in jobs]


async def test_stale_interims_are_skipped_never_run(queue):
    gate, ran = Gate(), []
    work = recording(gate, "running", ran)
    gate.hold()
    running = queue.submit(work, "running", final=False, key="s1")
    await gate.started()
    older = queue.submit(work, "s1 older interim", final=False, key="s1")
    newer = queue.submit(work, "s1 newer interim", final=False, key="s1")  # replaces the older one
    s2 = queue.submit(work, "s2 interim", final=False, key="s2")
    assert queue.discard("s2") == 1  # s2 finalized or closed: its queued interim is stale
    assert queue.discard("s1") == 1 and queue.submit(work, "s1 latest", final=False, key="s1")
    final = queue.submit(work, "s3 final", final=True, key="s3")
    assert queue.discard("s1") == 1  # discard never touches the running job
    assert queue.pending() == 1
    gate.release()
    assert await running.future == "running"
    assert await older.future is None and await newer.future is None and await s2.future is None
    assert await final.future == "s3 final"
    assert ran == ["running", "s3 final"]
    assert queue.skipped == 4


async def test_discarding_finals_keeps_other_keys_and_the_running_one(queue):
    gate, ran = Gate(), []
    work = recording(gate, "a running final", ran)
    gate.hold()
    running = queue.submit(work, "a running final", final=True, key="a")
    await gate.started()
    a_queued = queue.submit(work, "a queued final", final=True, key="a")
    b_queued = queue.submit(work, "b queued final", final=True, key="b")
    assert queue.discard("a", finals=True) == 1
    gate.release()
    assert [await running.future, await a_queued.future, await b_queued.future] == ["a running final", None, "b queued final"]
    assert ran == ["a running final", "b queued final"]


async def test_an_error_reaches_its_caller_and_the_queue_goes_on(queue):
    def fail():
        raise ValueError("bad audio")

    failed = queue.submit(fail, final=True)
    after = queue.submit(lambda: "next", final=False, key="x")
    with pytest.raises(ValueError, match="bad audio"):
        await failed.future
    assert await after.future == "next"


async def test_close_drops_what_is_queued_and_lets_the_running_one_finish(queue):
    gate = Gate()

    def blocked():
        gate.pass_through()
        return "finished"

    gate.hold()
    running = queue.submit(blocked, final=True)
    await gate.started()
    queued = queue.submit(lambda: "never", final=True)
    queue.close()
    gate.release()
    assert await running.future == "finished"
    assert await queued.future is None
    with pytest.raises(RuntimeError, match="closed"):
        queue.submit(lambda: None, final=True)


# -- streams on the queue -----------------------------------------------------------------------

class FakeWhisper:
    """What a WhisperSttStream needs from its provider; decodes record (stream, kind) as they run."""

    name = "whisper"
    word_timestamps = True
    language = "en"

    def __init__(self, has_interim_model: bool = False, pause_ms: int = 200) -> None:
        self.has_interim_model = has_interim_model  # periodic interims ("caption") on a second model
        self.pause_ms = pause_ms  # quiet audio that starts a pause decode (VOICEMESH_STT_PAUSE_MS)
        self.queue = DecodeQueue("fake-whisper")
        self.gate = Gate()
        self.names: dict[object, str] = {}
        self.submitted: list[tuple[str, str]] = []
        self.ran: list[tuple[str, str]] = []
        self.words: list[bool] = []  # word times asked for, per submitted decode
        self.aborted = asyncio.Event()

    def interim_model_covers(self, language: str) -> bool:
        return self.has_interim_model

    def open_stream(self, config: SttStreamConfig, name: str = "") -> WhisperSttStream:
        stream = WhisperSttStream(self, config, "en")
        self.names[stream] = name or f"s{len(self.names) + 1}"
        original_abort = stream.abort

        async def abort() -> None:  # lets a test wait for the service to give the stream up
            await original_abort()
            self.aborted.set()

        stream.abort = abort
        return stream

    def submit_decode(self, audio, language, words, offset_ms, final, key, interim=False):
        label = (self.names[key], "final" if final else "caption" if interim else "interim")
        self.words.append(words)
        self.submitted.append(label)
        return self.queue.submit(self._decode, label, len(audio), final=final, key=key)

    def _decode(self, label, samples):  # worker thread
        self.gate.pass_through()
        self.ran.append(label)
        return _Decoded(f"{label[0]} {label[1]} {samples * 1000 // 16000} ms", 0.9, ())

    def info(self) -> ProviderInfo:
        return ProviderInfo(provider="whisper", model="fake", sample_rates_hz=(16000,), details={"language": "en"})


@pytest.fixture
def whisper():
    fake = FakeWhisper()
    yield fake
    fake.gate.release()
    fake.queue.close()


def speech(ms: int) -> bytes:
    """Loud PCM16 at 16 kHz (a 440 Hz tone): never quiet to the pause detector."""
    return tone(ms / 1000, hz=440).astype("<i2").tobytes()


def silence(ms: int) -> bytes:
    return bytes(ms * 32)


async def results_until_end_of_utterance(stream, count: int = 1) -> list:
    received = []
    async with asyncio.timeout(WAIT_S):
        async for result in stream.results():
            received.append(result)
            if sum(isinstance(r, SttEndOfUtterance) for r in received) == count:
                return received
    raise AssertionError(f"results() ended early: {received}")


async def queue_interim(whisper: FakeWhisper, name: str, running: bool = False) -> WhisperSttStream:
    """A stream with an interim decode queued, or (`running`) running and held at the gate."""
    stream = whisper.open_stream(SttStreamConfig(), name)
    await stream.turn_start(f"{name}-turn", 0)
    await stream.push_audio(speech(800))  # past INTERIM_EVERY_MS: an interim is queued
    if running:
        await whisper.gate.started()
    else:
        assert stream._interim_task is not None and not stream._interim_running()
    return stream


async def test_a_final_goes_before_queued_interims_and_drops_its_own(whisper):
    whisper.gate.hold()
    await queue_interim(whisper, "A", running=True)
    b = await queue_interim(whisper, "B")
    c = await queue_interim(whisper, "C")
    c_interim = c._interim_task
    await b.finalize()  # B's queued interim is stale now; B's final jumps ahead of C's interim
    whisper.gate.release()
    final, end = await results_until_end_of_utterance(b)
    await c_interim  # C's interim runs after B's final: wait for it before reading the order
    assert final.is_final and final.text.startswith("B final") and end.turn_id == "B-turn"
    assert whisper.ran == [("A", "interim"), ("B", "final"), ("C", "interim")]
    assert ("B", "interim") not in whisper.ran and whisper.queue.skipped == 1


async def test_a_newer_interim_replaces_a_queued_one(whisper):
    whisper.gate.hold()
    await queue_interim(whisper, "A", running=True)
    b = await queue_interim(whisper, "B")
    await b.push_audio(speech(800))  # another interim is due while the first still waits: fresher audio
    whisper.gate.release()
    async with asyncio.timeout(WAIT_S):
        interim = await anext(aiter(b.results()))
    assert not interim.is_final and interim.end_ms == 1600
    assert whisper.ran == [("A", "interim"), ("B", "interim")]
    assert whisper.submitted.count(("B", "interim")) == 2 and whisper.queue.skipped == 1


async def test_the_pause_decode_in_flight_becomes_the_final(whisper):
    whisper.gate.hold()
    stream = whisper.open_stream(SttStreamConfig(interim_results=False), "A")
    await stream.turn_start("turn-1", 0)
    await stream.push_audio(speech(1000))
    for _ in range(3):  # 200 ms of quiet (PAUSE_MS) starts a decode at once
        await stream.push_audio(silence(100))
    await whisper.gate.started()
    await stream.finalize()  # the running pause decode covers everything said: reuse it
    whisper.gate.release()
    final, _ = await results_until_end_of_utterance(stream)
    assert final.is_final and final.text == "A interim 1200 ms"  # decoded at 200 ms of the pause
    assert whisper.submitted == [("A", "interim")]


async def test_the_pause_decode_starts_after_the_providers_pause_ms_of_quiet():
    for pause_ms, quiet_pushes in ((100, 1), (300, 3)):
        whisper = FakeWhisper(pause_ms=pause_ms)
        try:
            stream = whisper.open_stream(SttStreamConfig(interim_results=False, pause_transcripts=True), "A")
            await stream.turn_start("turn-1", 0)
            await stream.push_audio(speech(600))
            for _ in range(quiet_pushes - 1):
                await stream.push_audio(silence(100))
            assert whisper.submitted == [], (pause_ms, whisper.submitted)  # not yet: the pause is shorter
            await stream.push_audio(silence(100))
            async with asyncio.timeout(WAIT_S):
                at_pause = await anext(aiter(stream.results()))
            assert at_pause.at_pause and whisper.submitted == [("A", "interim")], (pause_ms, at_pause, whisper.submitted)
        finally:
            whisper.queue.close()


async def test_captions_go_to_the_interim_model_and_the_pause_decode_to_the_main_one():
    whisper = FakeWhisper(has_interim_model=True)
    try:
        whisper.gate.hold()
        stream = whisper.open_stream(SttStreamConfig(pause_transcripts=True), "A")
        await stream.turn_start("turn-1", 0)
        await stream.push_audio(speech(800))  # an interim is due: a caption, on the interim model
        await whisper.gate.started()
        for _ in range(3):  # the pause comes while the caption runs: it cannot cover the pause
            await stream.push_audio(silence(100))
        whisper.gate.release()
        async with asyncio.timeout(WAIT_S):
            caption = await anext(aiter(stream.results()))
        assert not caption.is_final and not caption.at_pause and caption.text == "A caption 800 ms"
        await stream.push_audio(silence(20))  # the next push starts the pause decode, on the main model
        async with asyncio.timeout(WAIT_S):
            at_pause = await anext(aiter(stream.results()))
        assert at_pause.at_pause and at_pause.text == "A interim 1120 ms"
        await stream.finalize()  # the pause decode becomes the final: no third decode
        final, _ = await results_until_end_of_utterance(stream)
        assert final.is_final and final.text == at_pause.text
        assert whisper.submitted == [("A", "caption"), ("A", "interim")]
        assert whisper.words == [False, True]  # captions carry no word times
    finally:
        whisper.gate.release()
        whisper.queue.close()


@pytest.mark.parametrize("has_interim_model", [False, True])
async def test_on_the_interim_model_no_caption_starts_in_a_quiet_tail(has_interim_model):
    whisper = FakeWhisper(has_interim_model)
    try:
        stream = whisper.open_stream(SttStreamConfig(), "A")
        await stream.turn_start("turn-1", 0)
        await stream.push_audio(speech(600))
        await stream.push_audio(silence(160))  # an interim is due, in a quiet run shorter than a pause
        kind = "caption" if has_interim_model else "interim"
        # With one model, an interim made now would cover the pause and become its decode; on the
        # interim model it would only hold up the pause decode, so it waits for speech.
        assert whisper.submitted == ([] if has_interim_model else [("A", kind)])
        await stream.push_audio(speech(100))
        assert whisper.submitted[-1] == ("A", kind)
        await stream.close()
    finally:
        whisper.queue.close()


async def test_a_queued_pause_decode_is_replaced_by_the_final(whisper):
    whisper.gate.hold()
    await queue_interim(whisper, "X", running=True)
    stream = whisper.open_stream(SttStreamConfig(interim_results=False), "A")
    await stream.turn_start("turn-1", 0)
    await stream.push_audio(speech(1000))
    for _ in range(3):
        await stream.push_audio(silence(100))
    assert whisper.submitted[-1] == ("A", "interim")  # the pause decode, queued behind X
    await stream.finalize()
    whisper.gate.release()
    final, _ = await results_until_end_of_utterance(stream)
    assert final.text.startswith("A final")
    assert whisper.ran == [("X", "interim"), ("A", "final")]


async def test_finals_of_one_stream_come_out_in_order(whisper):
    whisper.gate.hold()
    await queue_interim(whisper, "X", running=True)
    stream = whisper.open_stream(SttStreamConfig(interim_results=False), "A")
    for turn in ("t1", "t2", "t3"):
        await stream.turn_start(turn, stream._ms(stream._total))
        await stream.push_audio(speech(500))
        await stream.finalize()
    whisper.gate.release()
    received = await results_until_end_of_utterance(stream, 3)
    assert [(type(r).__name__, r.turn_id) for r in received] == [
        (kind, turn) for turn in ("t1", "t2", "t3") for kind in ("SttTranscript", "SttEndOfUtterance")]
    assert whisper.ran == [("X", "interim")] + [("A", "final")] * 3


async def test_close_still_answers_the_pending_final(whisper):
    whisper.gate.hold()
    await queue_interim(whisper, "X", running=True)
    stream = whisper.open_stream(SttStreamConfig(interim_results=False), "A")
    await stream.push_audio(speech(500))
    await stream.finalize()
    await stream.close()  # returns at once; results() ends after the final
    whisper.gate.release()
    received = [r async for r in stream.results()]
    assert [type(r) for r in received] == [SttTranscript, SttEndOfUtterance]


async def test_abort_drops_queued_decodes_and_ends_results(whisper):
    whisper.gate.hold()
    await queue_interim(whisper, "X", running=True)
    stream = whisper.open_stream(SttStreamConfig(), "A")
    await stream.push_audio(speech(500))
    await stream.finalize()
    await stream.abort()
    assert [r async for r in stream.results()] == []
    whisper.gate.release()
    done = whisper.queue.submit(lambda: "after", final=False, key="probe")  # runs once the worker is free
    assert await done.future == "after"
    assert ("A", "final") in whisper.submitted and ("A", "final") not in whisper.ran


# -- the service: what happens when the caller goes away ---------------------------------------

@pytest.fixture
async def stt_service(whisper):
    servicer = SttServicer(ServeSettings(kind="stt"), whisper)
    servicer.ready = True
    server = grpc.aio.server()
    stt_pb2_grpc.add_SttServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield stt_pb2_grpc.SttServiceStub(channel)
    await channel.close()
    await server.stop(None)


def _requests():
    pcm = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
    return stt_pb2.RecognizeRequest, stt_pb2.SttConfig(format=pcm, interim_results=False)


async def test_a_cancelled_call_gets_no_decode_of_its_trailing_audio(whisper, stt_service):
    request, config = _requests()
    call = stt_service.Recognize()
    await call.write(request(config=config))
    await call.write(request(turn_start=common_pb2.TurnContext(turn_id="t1", audio_offset_ms=0)))
    await call.write(request(audio=common_pb2.AudioChunk(data=speech(500))))
    await call.write(request(finalize=stt_pb2.Finalize(turn_id="t1")))
    async with asyncio.timeout(WAIT_S):
        responses = [await call.read(), await call.read()]
    assert responses[0].transcript.is_final and responses[1].HasField("end_of_utterance")
    await call.write(request(audio=common_pb2.AudioChunk(data=speech(1000))))  # after the last turn
    call.cancel()  # the session ended: the caller is gone
    async with asyncio.timeout(WAIT_S):
        await whisper.aborted.wait()
    probe = whisper.queue.submit(lambda: "idle", final=True)  # everything queued before it has run
    assert await probe.future == "idle"
    assert whisper.submitted == [("s1", "final")]


async def test_a_half_closed_call_still_gets_its_final(whisper, stt_service):
    request, config = _requests()
    call = stt_service.Recognize()
    await call.write(request(config=config))
    await call.write(request(audio=common_pb2.AudioChunk(data=speech(500))))
    await call.write(request(finalize=stt_pb2.Finalize(turn_id="asked")))
    await call.write(request(audio=common_pb2.AudioChunk(data=speech(300))))
    await call.done_writing()  # the client still reads: what it asked for and the rest are answered
    async with asyncio.timeout(WAIT_S):
        responses = [response async for response in call]
    finals = [r.transcript for r in responses if r.HasField("transcript")]
    assert [t.text for t in finals] == ["s1 final 500 ms", "s1 final 300 ms"]  # asked for, then the rest
    assert await call.code() == grpc.StatusCode.OK


# -- with_reader: no pending task is left behind when the consumer goes away ---------------------

async def test_with_reader_cancels_the_pending_result_when_closed():
    finished = asyncio.Event()
    blocked = asyncio.Event()

    async def reader():
        await asyncio.Event().wait()

    async def results():
        try:
            yield "first"
            blocked.set()
            await asyncio.Event().wait()  # a result that never comes
            yield "never"
        finally:
            finished.set()

    async def consume():
        async for _ in with_reader(reader(), results()):
            pass

    consumer = asyncio.create_task(consume())
    await blocked.wait()
    consumer.cancel()  # as gRPC cancels a handler whose caller has gone
    with pytest.raises(asyncio.CancelledError):
        await consumer
    async with asyncio.timeout(WAIT_S):
        await finished.wait()  # the results generator was closed, not left pending
