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

            _tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            _tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(_tracer_provider)

    readers = []
    for name in _exporter_names("METRICS"):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        elif name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    _meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    metrics.set_meter_provider(_meter_provider)
    log.info("telemetry", extra={"traces": sorted(_exporter_names("TRACES")), "metrics": sorted(_exporter_names("METRICS"))})


def shutdown() -> None:
    """Flush what is buffered (called on SIGTERM after the drain), then stop exporting."""
    if _tracer_provider is not None:
        _tracer_provider.force_flush(10_000)
        _tracer_provider.shutdown()
    if _meter_provider is not None:
        _meter_provider.force_flush(10_000)
        _meter_provider.shutdown()


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
