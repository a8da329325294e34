"""Many sessions' streams over one call, client side (VadService.DetectMany).

Each session's VAD stream costs one gRPC message per audio piece; with a hundred sessions
that is thousands of messages a second, at 25-45 µs of CPU each on both sides. Here every
session's stream is a `MultiplexedStream` on one shared call, and whatever all of them
have to send when the writer next runs leaves as one message. An urgent message (one that
may decide something now, such as the frame that completes the user's pause) wakes the
writer on the next turn of the event loop; any other waits at most LINGER_S, so that the
messages of many sessions share a write instead of each taking one.

A stream behaves like the single-stream call it replaces (`SerialStream`): `write`, async
iteration of responses, `cancel`, `done`. Its in-band error is raised from the iteration
as an `AioRpcError`, so a session handles a failed multiplexed stream and a failed call
the same way. When the call itself fails, every stream on it fails with its status and
the next stream opened starts a fresh call.

Faults, bounded as a session's own stream is (forwarding.StreamKeeper, the same rules): a
write on the call that waits WRITE_STALL_S means the service stopped reading (a hung replica:
it accepts and never answers), and the call is failed, so that the sessions' reopened streams
go to a fresh call (behind Envoy, on another replica) instead of joining the hung one. The
restarts of the call are counted per outage: one that fails before its call proved alive (it
answered something, or held QUIET_CONFIRM_S: a hung call can hold a few seconds before its
writes stall, so holding REOPEN_CONFIRM_S proves nothing here) is the next attempt; after
REOPEN_ATTEMPTS the streams on it fail for good (`gave_up`: their sessions end with a fatal
Error, as when their own attempts run out), and the next stream opened starts afresh.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from voicemesh.orchestrator.forwarding import REOPEN_ATTEMPTS, WRITE_STALL_S

log = logging.getLogger("voicemesh.mux")

LINGER_S = 0.01  # the longest a message that is not urgent waits for others to join it
BATCH_BYTES = 1 << 20  # one request stays well under the 4 MiB message limit
BACKLOG_BYTES = 16 << 20  # writers wait when this much is queued (the service is not keeping up)
QUIET_CONFIRM_S = 30.0  # a call that answered nothing is trusted after this long (a VAD with no speech says nothing)
_ENDED = object()


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class MultiplexedStream:
    def __init__(self, mux: "StreamMultiplexer", stream_id: int):
        self._mux, self.stream_id = mux, stream_id
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._error: grpc.aio.AioRpcError | None = None
        self._cancelled = False
        self.gave_up = False  # failed because the multiplexed call's restarts ran out: not worth reopening

    async def write(self, request, urgent: bool = True) -> None:
        if self._error is not None:
            raise self._error
        if not self._cancelled:
            await self._mux.send(self.stream_id, request, urgent)

    async def __aiter__(self):
        while (item := await self._inbox.get()) is not _ENDED:
            if isinstance(item, grpc.aio.AioRpcError):
                raise item
            yield item

    def cancel(self) -> bool:
        if self.done():
            return False
        self._cancelled = True
        self._mux.close_stream(self.stream_id)
        self._inbox.put_nowait(_ENDED)
        return True

    def done(self) -> bool:
        return self._cancelled or self._error is not None

    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def proven(self) -> bool:
        """The call under this stream has answered something (or held QUIET_CONFIRM_S): a session
        reopening onto it waits for this before it calls its outage over."""
        return self._mux.proven()

    def deliver(self, response) -> None:
        self._inbox.put_nowait(response)

    def fail(self, error: grpc.aio.AioRpcError, gave_up: bool = False) -> None:
        if not self.done():
            self._error, self.gave_up = error, gave_up
            self._inbox.put_nowait(error)


class StreamMultiplexer:
    """One multiplexed call at a time. `open_call()` starts it (e.g. `stub.DetectMany`);
    `request_cls` and `message_cls` are its request and per-stream message types."""

    def __init__(self, open_call, request_cls, message_cls, service: str):
        self._open_call, self._request_cls, self._message_cls = open_call, request_cls, message_cls
        self.service = service
        self._call = None
        self._tasks: list[asyncio.Task] = []
        self._streams: dict[int, MultiplexedStream] = {}
        self._next_id = 0
        self._pending: list[tuple[object, int]] = []  # (stream message, its size in bytes)
        self._pending_bytes = 0
        self._wakeup = asyncio.Event()
        self._linger: asyncio.TimerHandle | None = None  # wakes the writer for messages that are not urgent
        self._room = asyncio.Event()
        self._room.set()
        self._started_at = 0.0  # when the current call started (the loop's clock)
        self._proven = False  # the current call has answered something
        self._restarts = 0  # calls started since one last proved alive: the outage's attempts
        self._outage_since: float | None = None

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def open(self) -> MultiplexedStream:
        if self._call is None:
            self._start()
        self._next_id += 1
        stream = self._streams[self._next_id] = MultiplexedStream(self, self._next_id)
        return stream

    async def send(self, stream_id: int, request, urgent: bool) -> None:
        while self._pending_bytes >= BACKLOG_BYTES:
            self._room.clear()
            await self._room.wait()
        if stream_id not in self._streams:
            return  # it failed or was closed while waiting; its reader learns why
        self._queue(self._message_cls(stream_id=stream_id, request=request), 16 + request.ByteSize(), urgent)

    def close_stream(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None and self._call is not None:
            self._queue(self._message_cls(stream_id=stream_id, close=True), 8, urgent=False)

    def _queue(self, message, size: int, urgent: bool) -> None:
        self._pending.append((message, size))
        self._pending_bytes += size
        if urgent:
            self._wakeup.set()
        elif self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(LINGER_S, self._wakeup.set)

    def _start(self) -> None:
        if self._outage_since is not None:
            self._restarts += 1
        self._started_at, self._proven = asyncio.get_running_loop().time(), False
        call = self._call = self._open_call()  # nothing is pending: _fail emptied it
        self._tasks = [asyncio.create_task(self._write_loop(call)), asyncio.create_task(self._read_loop(call))]

    async def _write_loop(self, call) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                if self._linger is not None:
                    self._linger.cancel()  # what it waited for leaves now
                    self._linger = None
                while self._pending:
                    batch = self._take_batch()
                    async with asyncio.timeout(WRITE_STALL_S):  # flow control full: nobody reads
                        await call.write(self._request_cls(messages=batch))
        except TimeoutError:
            self._fail(call, rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.service}: a write on the multiplexed "
                                       f"call waited {WRITE_STALL_S:.0f} s: the service stopped reading"))
        except grpc.aio.AioRpcError as err:
            self._fail(call, err)
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as err:  # the call finished under us
            self._fail(call, rpc_error(grpc.StatusCode.UNAVAILABLE, f"{self.service}: multiplexed call closed ({err})"))
        except Exception as err:  # noqa: BLE001 - never leave the call up with nobody writing to it
            log.exception("%s multiplexed call: writer failed", self.service)
            self._fail(call, rpc_error(grpc.StatusCode.INTERNAL, f"{self.service}: multiplexed call writer failed ({err!r})"))

    def _take_batch(self) -> list:
        if self._pending_bytes <= BATCH_BYTES:  # the usual case: everything in one message
            batch, self._pending, self._pending_bytes = self._pending, [], 0
        else:
            size = count = 0
            while count < len(self._pending) and (count == 0 or size + self._pending[count][1] <= BATCH_BYTES):
                size += self._pending[count][1]
                count += 1
            batch, self._pending = self._pending[:count], self._pending[count:]
            self._pending_bytes -= size
        if self._pending_bytes < BACKLOG_BYTES:
            self._room.set()
        return [message for message, _ in batch]

    async def _read_loop(self, call) -> None:
        try:
            async for response in call:
                if not self._proven:  # it answers: the outage, if any, is over
                    self._proven, self._restarts, self._outage_since = True, 0, None
                for event in response.events:
                    stream = self._streams.get(event.stream_id)
                    if stream is None:
                        continue  # closed by its session meanwhile
                    if event.HasField("error"):
                        del self._streams[event.stream_id]
                        stream.fail(rpc_error(_status(event.error.code), event.error.message))
                    else:
                        stream.deliver(event.response)
            error = rpc_error(grpc.StatusCode.UNAVAILABLE, f"{self.service}: the multiplexed call ended")
        except grpc.aio.AioRpcError as err:
            error = err
        except Exception as err:  # noqa: BLE001 - every stream must learn that nobody reads for it
            log.exception("%s multiplexed call: reader failed", self.service)
            error = rpc_error(grpc.StatusCode.INTERNAL, f"{self.service}: multiplexed call reader failed ({err!r})")
        self._fail(call, error)

    def _fail(self, call, error: grpc.aio.AioRpcError) -> None:
        """The call is gone: every stream on it fails; the next open() starts a new call."""
        if self._call is not call:
            return
        gave_up = self._count_failure()
        if gave_up:
            error = rpc_error(error.code(), f"{error.details()} (the multiplexed call was restarted {self._restarts} times "
                                            f"in {asyncio.get_running_loop().time() - self._outage_since:.1f} s; giving up)")
            self._restarts, self._outage_since = 0, None  # the next stream opened tries afresh
        if self._streams:
            log.warning("%s multiplexed call failed (%d streams): %s %s", self.service, len(self._streams),
                        error.code().name, error.details())
        self._call = None
        call.cancel()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(error, gave_up)
        self._pending, self._pending_bytes = [], 0
        if self._linger is not None:  # nothing of this call is left to wait for
            self._linger.cancel()
            self._linger = None
        self._room.set()

    def proven(self) -> bool:
        now = asyncio.get_running_loop().time()
        return self._call is not None and (self._proven or now - self._started_at >= QUIET_CONFIRM_S)

    def _count_failure(self) -> bool:
        """The current call failed: start or go on with an outage; True when its attempts ran out."""
        now = asyncio.get_running_loop().time()
        if self.proven():
            self._restarts, self._outage_since = 0, now  # it was alive: a new outage begins
        elif self._outage_since is None:
            self._outage_since = self._started_at  # the first call never proved alive
        return self._restarts >= REOPEN_ATTEMPTS

    async def close(self) -> None:
        if self._call is not None:
            self._fail(self._call, rpc_error(grpc.StatusCode.UNAVAILABLE, f"{self.service}: the orchestrator is shutting down"))
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _status(name: str) -> grpc.StatusCode:
    return grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)
