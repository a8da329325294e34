"""OpenTelemetry for every process: traces and metrics over OTLP/gRPC, configured by OTEL_*.

Exporting is off unless OTEL_EXPORTER_OTLP_ENDPOINT (or the per-signal variants) is set;
OTEL_TRACES_EXPORTER=console / OTEL_METRICS_EXPORTER=console print to stderr instead.
Sampling follows OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (parent-based ratio works).
Spans are always created (so trace context still flows through a process that does not
export); without an exporter they cost a few microseconds and go nowhere.

Content (transcripts, prompts, replies, spoken text) goes into span attributes only while
VOICEMESH_TRACE_CONTENT is not "false"; callers use `content()` to respect that.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import Status, StatusCode

log = logging.getLogger("voicemesh.telemetry")
_tracer_provider: TracerProvider | None = None
_meter_provider: MeterProvider | None = None
_otlp_exporters: list = []  # shut down directly when flushing at exit overruns its budget
# At exit, flushing gets this long in all. The OTLP exporter retries a failed export with backoff
# for up to OTEL_EXPORTER_OTLP_TIMEOUT (10 s) per batch, and the SDK's flush timeouts do not
# reach it (opentelemetry-python#4568), so a dead collector held every stopping process 10+ s.
SHUTDOWN_SECONDS = 1.0


def _wants_otlp(signal: str) -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))


def _exporter_names(signal: str) -> set[str]:
    names = os.environ.get(f"OTEL_{signal}_EXPORTER", "")
    chosen = {name.strip() for name in names.split(",") if name.strip()}
    if not chosen and _wants_otlp(signal):
        chosen = {"otlp"}
    return chosen - {"none"}


def setup(kind: str, attributes: Mapping[str, str]) -> None:
    """Install the process's tracer and meter providers. Call once, before serving."""
    global _tracer_provider, _meter_provider
    resource = Resource.create({"service.name": f"voicemesh-{kind}", "voicemesh.service": kind, **attributes})
    _tracer_provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    for name in _exporter_names("TRACES"):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            _otlp_exporters.append(exporter := OTLPSpanExporter())
            _tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        elif name == "console":
            _tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(_tracer_provider)

    readers = []
    for name in _exporter_names("METRICS"):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            _otlp_exporters.append(exporter := OTLPMetricExporter())
            readers.append(PeriodicExportingMetricReader(exporter))
        elif name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    _meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    metrics.set_meter_provider(_meter_provider)
    log.info("telemetry", extra={"traces": sorted(_exporter_names("TRACES")), "metrics": sorted(_exporter_names("METRICS"))})


def shutdown(timeout: float = SHUTDOWN_SECONDS) -> None:
    """Flush what is buffered (called on SIGTERM after the drain), then stop exporting.

    Takes at most about `timeout` seconds (plus up to one more to stop the exporters): what
    has not left by then is dropped, so an unreachable collector cannot hold up a stop."""
    providers = [provider for provider in (_tracer_provider, _meter_provider) if provider is not None]
    if not providers:
        return
    millis = int(timeout * 1000)

    def flush_and_stop() -> None:
        for provider in providers:
            with contextlib.suppress(Exception):  # a failed flush must not keep the other one in
                provider.force_flush(millis)
        if _tracer_provider is not None:
            _tracer_provider.shutdown()
        if _meter_provider is not None:
            _meter_provider.shutdown(timeout_millis=millis)

    worker = threading.Thread(target=flush_and_stop, name="telemetry-shutdown", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        log.warning("telemetry not flushed within %.1f s (collector unreachable?); dropping the rest", timeout)
        for exporter in _otlp_exporters:
            # Public API, safe beside an export in flight: it ends the exporter's retry wait at
            # once and closes its channel, which cancels the call; further exports fail at once.
            exporter.shutdown()
        worker.join(1.0)


def tracer() -> trace.Tracer:
    return trace.get_tracer("voicemesh")


def meter() -> metrics.Meter:
    return metrics.get_meter("voicemesh")


def content_enabled() -> bool:
    return os.environ.get("VOICEMESH_TRACE_CONTENT", "true").lower() not in ("false", "0", "no", "off")


def content(text: str) -> str | None:
    """The text, or None (attribute left out) when content tracing is off."""
    return text if content_enabled() else None


def set_attributes(span: trace.Span, attributes: Mapping[str, object]) -> None:
    """Set the attributes that are not None (None marks left-out content)."""
    span.set_attributes({key: value for key, value in attributes.items() if value is not None})


# ---- propagation ----------------------------------------------------------------------
def context_from_metadata(metadata: Sequence[tuple[str, str]] | None) -> Context:
    """The caller's trace context from gRPC metadata (W3C traceparent/tracestate)."""
    return propagate.extract({key: value for key, value in (metadata or ())})


def context_from_traceparent(traceparent: str, tracestate: str = "") -> Context:
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return propagate.extract(carrier) if traceparent else Context()


def metadata_for(span: trace.Span) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying `span` as the parent, for a per-turn call."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return tuple(carrier.items())


def traceparent_of(span: trace.Span) -> tuple[str, str]:
    """The span's W3C context as (traceparent, tracestate), for a TurnContext message."""
    carrier = dict(metadata_for(span))
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


@contextlib.contextmanager
def service_span(name: str, parent: Context, attributes: Mapping[str, object] | None = None, start_time: int | None = None):
    """A span for one unit of work in a service: cancellation is marked, failures recorded, and
    the span always ends (grpc cancels a handler when its caller goes away)."""
    span = tracer().start_span(name, context=parent, start_time=start_time)
    set_attributes(span, attributes or {})
    try:
        yield span
    except (asyncio.CancelledError, GeneratorExit):
        span.set_attribute("cancelled", True)
        raise
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
        raise
    finally:
        span.end()


def is_speculative(metadata: Sequence[tuple[str, str]] | None) -> bool:
    """The orchestrator marks replies started before the end of the user's turn was confirmed."""
    return any(key == "voicemesh-speculative" and value == "1" for key, value in (metadata or ()))
