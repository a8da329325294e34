"""Helpers for streaming calls: read requests in a task, yield results, fail fast (handlers); wait
before refusing a caller; raise the peer's own status when a write fails (clients)."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable

import grpc

# How long a streaming call about to be refused waits for the caller's first message (see before_refusing).
REFUSAL_WAIT_SECS = 5.0


async def with_reader(reader: Awaitable[None], results: AsyncIterator) -> AsyncIterator:
    """Yield from `results` while `reader` consumes the request stream in its own task.

    If the reader fails (bad input), its exception is raised here at once, even while no
    result is pending, so the handler can turn it into a status. The reader is cancelled
    when the results end or the consumer goes away.
    """
    reader_task = asyncio.ensure_future(reader)
    iterator = aiter(results)
    next_result: asyncio.Future | None = None
    try:
        while True:
            next_result = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({next_result, reader_task}, return_when=asyncio.FIRST_COMPLETED)
            if reader_task in done and reader_task.exception() is not None and next_result not in done:
                next_result.cancel()
                raise reader_task.exception()
            if next_result not in done:
                # The reader finished cleanly; keep draining results until they end.
                done, _ = await asyncio.wait({next_result})
            try:
                yield next_result.result()
            except StopAsyncIteration:
                break
    finally:
        # Cancelled (the call went away): the pending anext() task would be left pending and
        # later garbage-collected ("Task was destroyed but it is pending!"); cancel it instead.
        if next_result is not None and not next_result.done():
            next_result.cancel()
        elif next_result is not None and not next_result.cancelled():
            next_result.exception()  # retrieved: an end of results nobody read is no "never retrieved" error
        if not reader_task.done():
            reader_task.cancel()
        elif not reader_task.cancelled() and reader_task.exception() is not None:
            raise reader_task.exception()


async def write_or_status(call, message) -> None:
    """Write to a client call; if the peer has already ended the call, raise its own status.

    A write to an ended grpc.aio call fails with "INTERNAL: Internal error from Core", which
    would hide the peer's reason (UNAUTHENTICATED, UNAVAILABLE: no healthy upstream,
    RESOURCE_EXHAUSTED, ...). The peer's status is raised when the call already holds it."""
    try:
        await call.write(message)
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):  # the latter: "RPC already finished"
        if not call.done():
            raise
        code, details = await call.code(), await call.details()
        if code == grpc.StatusCode.OK:
            raise
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details) from None


async def before_refusing(request_iterator, timeout_s: float = REFUSAL_WAIT_SECS) -> None:
    """Wait for a streaming caller's first message or its half-close, `timeout_s` at most, before
    the handler refuses the call. A grpc.aio client whose first write is still in flight when the
    refusal lands reports "INTERNAL: Internal error from Core" and loses the refusal's status
    (UNAUTHENTICATED, RESOURCE_EXHAUSTED, UNAVAILABLE); the bound keeps a silent caller from
    holding the call."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await anext(aiter(request_iterator), None)
