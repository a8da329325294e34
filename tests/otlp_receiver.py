"""A test OTLP/gRPC receiver built from opentelemetry-proto's TraceService and MetricsService:
it keeps every span and metric the processes export, with their resources."""
from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def attributes(key_values) -> dict:
    return {kv.key: _value(kv.value) for kv in key_values}


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict
    service: str  # the resource's service.name
    resource: dict


@dataclass
class Receiver:
    spans: list[ReceivedSpan] = field(default_factory=list)
    metrics: list[tuple[str, str]] = field(default_factory=list)  # (service.name, metric name)
    lock: threading.Lock = field(default_factory=threading.Lock)
    received: threading.Condition = field(init=False)  # notified after every export
    port: int = 0
    server: grpc.Server | None = None

    def __post_init__(self) -> None:
        self.received = threading.Condition(self.lock)

    def wait_until(self, predicate, timeout: float) -> bool:
        """Until `predicate(spans)` holds (checked under the lock after each export), or
        `timeout` seconds pass; returns whether it held."""
        deadline = time.monotonic() + timeout
        with self.received:
            while not predicate(self.spans):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.received.wait(remaining)
            return True

    def start(self) -> "Receiver":
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                with receiver.lock:
                    for resource_spans in request.resource_spans:
                        resource = attributes(resource_spans.resource.attributes)
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                receiver.spans.append(ReceivedSpan(
                                    span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                                    span.start_time_unix_nano, span.end_time_unix_nano, attributes(span.attributes),
                                    resource.get("service.name", ""), resource))
                    receiver.received.notify_all()
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                with receiver.lock:
                    for resource_metrics in request.resource_metrics:
                        service = attributes(resource_metrics.resource.attributes).get("service.name", "")
                        for scope_metrics in resource_metrics.scope_metrics:
                            receiver.metrics.extend((service, metric.name) for metric in scope_metrics.metrics)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=1).wait()

    def env(self) -> dict[str, str]:
        """What every process needs to export here, promptly."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        }
