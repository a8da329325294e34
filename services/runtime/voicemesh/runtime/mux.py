"""Many streams over one call, server side (VadService.DetectMany and calls of its shape).

A client that runs many sessions (the orchestrator) would otherwise pay gRPC's per-message
cost (25-45 µs of CPU on each side) once per session for every audio piece. A multiplexed
call carries every stream's pending messages in one request and every stream's events in
one response, so that cost is paid once per batch.

The request carries `messages` {stream_id, request, close}; the response `events`
{stream_id, response, error}. Each stream runs the same handler as the single-stream RPC,
in its own task (one stream waiting on a model never holds up the others), and ends alone:
its error goes back in-band as a `common.Error` and the call goes on.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable

from voicemesh.runtime.errors import ResourceExhausted, counted_stream, status_of
from voicemesh.v1 import common_pb2

log = logging.getLogger("voicemesh.mux")

MAX_STREAMS_PER_CALL = 10_000
MAX_QUEUED_PER_STREAM = 500  # messages not yet taken by the stream's handler (~20 s of 40 ms audio)
ENDED_IDS_KEPT = 4096  # late messages for a stream that ended are ignored, not reopened


class _Stream:
    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task

    async def requests(self) -> AsyncIterator:
        while (request := await self.queue.get()) is not None:
            yield request


class MultiplexedCall:
    """Serves one multiplexed call. `handler(requests)` is the single-stream logic: an async
    generator of responses over an async iterator of requests, raising StreamError."""

    def __init__(self, handler: Callable, response_cls, event_cls, source: str, rpc: str, stream_rpc: str):
        """`rpc` names the call (e.g. DetectMany) in messages; `stream_rpc` (e.g. Detect) labels
        each stream's logs and metrics, so dashboards count sessions the same either way."""
        self.handler, self.response_cls, self.event_cls = handler, response_cls, event_cls
        self.source, self.rpc, self.stream_rpc = source, rpc, stream_rpc
        self.streams: dict[int, _Stream] = {}
        self.ended: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.outbox: list = []
        self.ready = asyncio.Event()
        self.reading_done = False

    async def serve(self, request_iterator) -> AsyncIterator:
        reader = asyncio.create_task(self._read(request_iterator))
        try:
            while True:
                await self.ready.wait()
                self.ready.clear()
                if self.outbox:
                    events, self.outbox = self.outbox, []
                    yield self.response_cls(events=events)
                if reader.done():
                    reader.result()  # the call's own failure (not a stream's) ends the call
                    if not self.streams and not self.outbox:
                        return
        finally:
            reader.cancel()
            for stream in self.streams.values():
                stream.task.cancel()

    def _emit(self, event) -> None:
        self.outbox.append(event)
        self.ready.set()

    async def _read(self, request_iterator) -> None:
        try:
            async for batch in request_iterator:
                for message in batch.messages:
                    self._dispatch(message)
        finally:
            self.reading_done = True
            for stream in self.streams.values():  # the client half-closed: every stream ends as Detect would
                stream.queue.put_nowait(None)
            self.ready.set()

    def _dispatch(self, message) -> None:
        stream_id = message.stream_id
        stream = self.streams.get(stream_id)
        if message.close:
            if stream is not None:
                stream.task.cancel()  # its done callback forgets it, even if it never ran
            return
        if stream is None:
            if stream_id in self.ended:
                return
            if len(self.streams) >= MAX_STREAMS_PER_CALL:
                self._end(stream_id, ResourceExhausted(
                    f"{self.rpc}: {MAX_STREAMS_PER_CALL} streams are open on this call; close some or open another call"))
                return
            stream = self.streams[stream_id] = _Stream()
            stream.task = asyncio.create_task(self._run(stream_id, stream))
            # Not a `finally` in _run: a task cancelled before its first step never runs it.
            stream.task.add_done_callback(lambda _, ended=stream_id: self._forget(ended))
        if stream.queue.qsize() >= MAX_QUEUED_PER_STREAM:
            stream.task.cancel()
            self._end(stream_id, ResourceExhausted(
                f"{self.rpc}: stream {stream_id} fell {MAX_QUEUED_PER_STREAM} messages behind; "
                "send larger pieces or fewer streams per call"))
            return
        stream.queue.put_nowait(message.request)

    async def _run(self, stream_id: int, stream: _Stream) -> None:
        with counted_stream(self.stream_rpc):
            try:
                async for response in self.handler(stream.requests()):
                    self._emit(self.event_cls(stream_id=stream_id, response=response))
            except asyncio.CancelledError:
                pass  # closed by the client, or the call ended
            except Exception as err:  # noqa: BLE001 - one stream's failure ends that stream only
                self._end(stream_id, err)

    def _end(self, stream_id: int, err: BaseException) -> None:
        code, message = status_of(err, self.stream_rpc)
        self._emit(self.event_cls(stream_id=stream_id, error=common_pb2.Error(
            code=code.name, message=message, fatal=True, source=self.source)))
        self._forget(stream_id)

    def _forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if stream_id not in self.ended:
            self.ended[stream_id] = None
            if len(self.ended) > ENDED_IDS_KEPT:
                self.ended.popitem(last=False)
        if self.reading_done:
            self.ready.set()  # the call may be finished now
