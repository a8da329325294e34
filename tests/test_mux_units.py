"""How the orchestrator's multiplexer batches streams' messages into writes of one call.

Pure unit tests over a recording stand-in for the gRPC call (the real call, over loopback,
is exercised in tests/test_vad_multiplex.py): which messages share a write, in what order,
and what the streams see when the call fails.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest

from voicemesh.orchestrator import mux as mux_module
from voicemesh.orchestrator.mux import StreamMultiplexer
from voicemesh.v1 import common_pb2, vad_pb2


WAIT_S = 30.0  # deadline for a write that is due (LINGER_S at most, on an idle loop); never a speed claim


class RecordingCall:
    def __init__(self):
        self.writes: list[list[tuple[int, int, bool]]] = []  # per write: (stream, offset_ms, close)
        self.responses: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self._written = asyncio.Event()

    async def write(self, request) -> None:
        self.writes.append([(m.stream_id, m.request.audio.offset_ms, m.close) for m in request.messages])
        self._written.set()

    async def wait_until(self, done, what: str) -> list:
        """Until `done(writes)` holds; returns the writes. The linger timer is the mux's own:
        waiting for its writes, not for a span of time, keeps the test independent of speed."""
        try:
            async with asyncio.timeout(WAIT_S):
                while not done(self.writes):
                    self._written.clear()
                    await self._written.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} after {WAIT_S:.0f} s; writes: {self.writes}") from None
        return self.writes

    async def wait_writes(self, count: int) -> list:
        return await self.wait_until(lambda writes: len(writes) >= count, f"{count} writes")

    async def _read(self):
        while (item := await self.responses.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    def __aiter__(self):
        return self._read()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def audio(offset_ms: int, size: int = 1280) -> vad_pb2.DetectRequest:
    return vad_pb2.DetectRequest(audio=common_pb2.AudioChunk(data=bytes(size), offset_ms=offset_ms))


def make_mux():
    calls: list[RecordingCall] = []

    def open_call():
        calls.append(RecordingCall())
        return calls[-1]

    return StreamMultiplexer(open_call, vad_pb2.DetectManyRequest, vad_pb2.DetectStreamMessage, "vad"), calls


def test_pieces_that_are_not_urgent_share_one_write_and_an_urgent_one_leaves_at_once():
    async def run():
        mux, calls = make_mux()
        streams = [mux.open() for _ in range(3)]
        for index, stream in enumerate(streams):
            await stream.write(audio(index * 40), urgent=False)
        await asyncio.sleep(0)
        assert calls[0].writes == []  # lingering for company
        assert await calls[0].wait_writes(1) == [[(1, 0, False), (2, 40, False), (3, 80, False)]]
        await streams[1].write(audio(120), urgent=True)
        # Urgent: it leaves within a few turns of the event loop, with no timer (turns are
        # counted, not time, so this holds however slow the machine).
        for _ in range(3):
            await asyncio.sleep(0)
        assert calls[0].writes[1:] == [[(2, 120, False)]]
        streams[0].cancel()
        assert (await calls[0].wait_writes(3))[2] == [(1, 0, True)]
        await mux.close()

    asyncio.run(run())


def test_a_large_backlog_goes_in_several_writes_in_order(monkeypatch):
    monkeypatch.setattr(mux_module, "BATCH_BYTES", 4000)

    async def run():
        mux, calls = make_mux()
        stream = mux.open()
        for index in range(7):
            await stream.write(audio(index * 40), urgent=False)
        def offsets(writes):
            return [offset for write in writes for _, offset, _ in write]

        await calls[0].wait_until(lambda writes: len(offsets(writes)) >= 7, "write of all 7 pieces")
        sent = offsets(calls[0].writes)
        assert sent == [index * 40 for index in range(7)]
        assert len(calls[0].writes) == 3  # ~1300 bytes each: three fit under 4000
        await mux.close()

    asyncio.run(run())


def test_events_reach_their_stream_and_a_failed_call_fails_every_stream():
    async def run():
        mux, calls = make_mux()
        first, second = mux.open(), mux.open()
        started = vad_pb2.DetectResponse(speech_started=vad_pb2.SpeechStarted(offset_ms=300))
        calls[0].responses.put_nowait(vad_pb2.DetectManyResponse(events=[
            vad_pb2.DetectStreamEvent(stream_id=2, response=started),
            vad_pb2.DetectStreamEvent(stream_id=1, error=common_pb2.Error(code="INVALID_ARGUMENT", message="bad")),
        ]))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as first_error:
            async for response in first:
                received.append(response)
        assert received == [] and first_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert first.done() and not first.cancelled()
        iterator = aiter(second)
        assert (await anext(iterator)).speech_started.offset_ms == 300
        calls[0].responses.put_nowait(None)  # the call ends under its streams
        with pytest.raises(grpc.aio.AioRpcError) as second_error:
            await anext(iterator)
        assert second_error.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError):
            await second.write(audio(0))
        third = mux.open()  # a fresh call for the next stream
        assert len(calls) == 2 and calls[0].cancelled and not third.done()
        await mux.close()

    asyncio.run(run())
