"""Errors that end one stream with a clear status, and the helpers that raise them.

Servicers raise these anywhere in a stream handler; `stream_guard` turns them into the
matching gRPC status so only that stream ends and the process keeps serving.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

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


class ResourceExhausted(StreamError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(StreamError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(StreamError):
    """An upstream provider refused the credentials this service holds (not the caller's)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(StreamError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(StreamError):
    """A model, voice or deployment that the provider does not have."""

    code = grpc.StatusCode.NOT_FOUND


class DeadlineExceeded(StreamError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


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


def status_of(err: BaseException, what: str) -> tuple[grpc.StatusCode, str]:
    """The status a stream ends with for `err`, logged and counted once here. Unexpected
    errors become INTERNAL, with the traceback in the log and none for the peer."""
    if isinstance(err, ClosedBeforeFirstMessage):
        log.debug("%s closed before its first message", what)
        return err.code, err.message
    counters = _stream_metrics()
    if isinstance(err, DecodeError):  # gRPC raises it in the handler's request iterator: the caller's bytes
        err = InvalidInput(f"{what}: a request is not a valid protobuf message ({err})")
    if isinstance(err, StreamError):
        log.info("%s rejected: %s %s", what, err.code.name, err.message)
        counters.errors.add(1, {"rpc": what, "code": err.code.name})
        return err.code, err.message
    log.error("%s failed", what, exc_info=err)
    counters.errors.add(1, {"rpc": what, "code": "INTERNAL"})
    return grpc.StatusCode.INTERNAL, f"{what} failed inside the server; see its logs"


@contextlib.contextmanager
def counted_stream(what: str):
    """Counts the stream as open while the block runs (a gauge for autoscaling)."""
    counters = _stream_metrics()
    counters.active.add(1, {"rpc": what})
    try:
        yield
    finally:
        counters.active.add(-1, {"rpc": what})


@contextlib.asynccontextmanager
async def stream_guard(context: grpc.aio.ServicerContext, what: str) -> AsyncIterator[None]:
    """Map StreamError to its status; anything unexpected to INTERNAL (see status_of)."""
    with counted_stream(what):
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except Exception as err:  # noqa: BLE001 - last line of defence for one stream
            code, message = status_of(err, what)
            await context.abort(code, message)


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


class MalformedRequests(grpc.aio.ServerInterceptor):
    """gRPC parses a unary request before any handler runs and answers UNKNOWN ("Unexpected
    DecodeError") when the bytes are not the method's message; this parses them inside the
    handler instead, so the caller gets INVALID_ARGUMENT. Streamed requests are parsed in the
    handler's request iterator already (status_of maps their DecodeError)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method

        async def parsed(raw, context):
            try:
                return parse(raw)
            except DecodeError as err:
                log.info("%s rejected: INVALID_ARGUMENT malformed request (%s)", method, err)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the request is not a valid protobuf message")

        if handler.response_streaming:
            behavior = handler.unary_stream

            async def unary_stream(raw, context):
                result = behavior(await parsed(raw, context), context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                else:  # a handler that writes with context.write
                    await result

            return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=handler.response_serializer)
        behavior = handler.unary_unary

        async def unary_unary(raw, context):
            result = behavior(await parsed(raw, context), context)
            return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=handler.response_serializer)
