"""Errors that end one stream with a clear status, and the helpers that raise them.

Servicers raise these anywhere in a stream handler; `stream_guard` turns them into the
matching gRPC status so only that stream ends and the process keeps serving.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from voicemesh.runtime import telemetry

log = logging.getLogger("voicemesh.errors")


class StreamError(Exception):
    """Ends the current stream with `code` and a message a user can act on."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(StreamError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(StreamError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(StreamError):
    code = grpc.StatusCode.UNAVAILABLE


class ClosedBeforeFirstMessage(FailedPrecondition):
    """The caller closed the stream without sending anything. It still gets the status, but
    nothing was asked and nothing failed: callers may open calls ahead of need and drop the
    ones they do not use (the orchestrator does, for each turn's LLM and TTS calls), so this
    is logged at debug level and not counted as an error."""


class _StreamMetrics:
    """Open streams (a gauge for autoscaling) and errors by status code, per process."""

    def __init__(self) -> None:
        meter = telemetry.meter()
        self.active = meter.create_up_down_counter("voicemesh.streams.active", description="Open streams")
        self.errors = meter.create_counter("voicemesh.errors", description="Streams ended with an error, by status code")


_metrics: _StreamMetrics | None = None


def _stream_metrics() -> _StreamMetrics:
    global _metrics
    if _metrics is None:  # created lazily: the meter provider is installed at startup
        _metrics = _StreamMetrics()
    return _metrics


@contextlib.asynccontextmanager
async def stream_guard(context: grpc.aio.ServicerContext, what: str) -> AsyncIterator[None]:
    """Map StreamError to its status; log anything unexpected as INTERNAL without a traceback to the peer."""
    counters = _stream_metrics()
    counters.active.add(1, {"rpc": what})
    try:
        yield
    except ClosedBeforeFirstMessage as err:
        log.debug("%s closed before its first message", what)
        await context.abort(err.code, err.message)
    except StreamError as err:
        log.info("%s rejected: %s %s", what, err.code.name, err.message)
        counters.errors.add(1, {"rpc": what, "code": err.code.name})
        await context.abort(err.code, err.message)
    except grpc.aio.AbortError:
        raise
    except Exception:  # noqa: BLE001 - last line of defence for one stream
        log.exception("%s failed", what)
        counters.errors.add(1, {"rpc": what, "code": "INTERNAL"})
        await context.abort(grpc.StatusCode.INTERNAL, f"{what} failed inside the server; see its logs")
    finally:
        counters.active.add(-1, {"rpc": what})


async def first_message(request_iterator, config_field: str, rpc: str):
    """Read the first request of a stream; it must carry `config_field`, or the stream ends."""
    try:
        first = await anext(aiter(request_iterator))
    except StopAsyncIteration:
        raise ClosedBeforeFirstMessage(f"{rpc}: the stream closed before its first message ({config_field})") from None
    kind = first.WhichOneof(first.DESCRIPTOR.oneofs[0].name)
    if kind != config_field:
        raise FailedPrecondition(
            f"{rpc}: the first message must be `{config_field}`, got `{kind or 'nothing'}`; "
            f"send the {config_field} before any other message"
        )
    return getattr(first, config_field)
