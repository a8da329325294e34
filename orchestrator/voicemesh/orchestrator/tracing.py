"""Traces and metrics of one session: a `conversation` span, a `turn` span per turn, and
the orchestrator's histograms and counters.

Every span gets an explicit parent (never the ambient context), so concurrent sessions can
never nest into each other. Service spans (vad, stt, llm, tts) are created in the service
processes: per-turn calls carry the turn's context in gRPC metadata, session-long streams
get it in the TurnContext message.
"""
from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from voicemesh.runtime import telemetry


class OrchestratorMetrics:
    """Created once per process (instruments are shared by all sessions)."""

    def __init__(self) -> None:
        meter = telemetry.meter()
        self.voice_to_voice = meter.create_histogram(
            "voicemesh.turn.voice_to_voice", unit="ms", description="End of user speech to first bot audio sent")
        self.ttfb = meter.create_histogram(
            "voicemesh.ttfb", unit="ms", description="Time to first result per service, seen from the orchestrator")
        self.hop = meter.create_histogram(
            "voicemesh.orchestrator.hop", unit="ms", description="Latency the orchestrator adds per forwarded message")
        self.sessions = meter.create_counter("voicemesh.sessions", description="Sessions started")
        self.turns = meter.create_counter("voicemesh.turns", description="Turns started")
        self.interruptions = meter.create_counter("voicemesh.interruptions", description="Bot replies cut by barge-in")
        self.turns_ended = meter.create_counter("voicemesh.turns.ended", description="Turns ended, by TurnEnded reason")
        self.delayed = meter.create_counter(
            "voicemesh.turn.delayed", description="Turns reported late (TurnDelayed), by what they wait for")
        self.errors = meter.create_counter("voicemesh.session.errors", description="In-band errors, by code and source")
        self.active_sessions = meter.create_up_down_counter("voicemesh.sessions.active", description="Open sessions")


_metrics: OrchestratorMetrics | None = None


def metrics() -> OrchestratorMetrics:
    global _metrics
    if _metrics is None:
        _metrics = OrchestratorMetrics()
    return _metrics


def wall_ns(monotonic_s: float) -> int:
    """A time.monotonic() instant as epoch nanoseconds (span timestamps are wall clock)."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


class SessionTracing:
    def __init__(self, session_id: str, client_metadata, attributes: dict[str, str]):
        parent = telemetry.context_from_metadata(client_metadata)  # joins the client's trace, if any
        span_attributes = {key: value for key, value in attributes.items() if not key.startswith("conversation.")}
        span_attributes.update({"conversation.id": session_id, "conversation.type": "voice"})
        self.session_id = session_id
        self.conversation = telemetry.tracer().start_span("conversation", context=parent, attributes=span_attributes)
        self._context = trace.set_span_in_context(self.conversation)
        metrics().sessions.add(1)
        metrics().active_sessions.add(1)

    def start_turn(self, number: int, turn_id: str, started_at_monotonic: float) -> trace.Span:
        metrics().turns.add(1)
        return telemetry.tracer().start_span(
            "turn", context=self._context, start_time=wall_ns(started_at_monotonic),
            attributes={"turn.number": number, "turn.id": turn_id, "conversation.id": self.session_id},
        )

    @staticmethod
    def end_turn(span: trace.Span, duration_s: float, interrupted: bool, voice_to_voice_ms: float, reason: str) -> None:
        span.set_attribute("turn.duration_seconds", duration_s)
        span.set_attribute("turn.was_interrupted", interrupted)
        span.set_attribute("turn.end_reason", reason)
        metrics().turns_ended.add(1, {"reason": reason})
        if voice_to_voice_ms > 0:
            span.set_attribute("turn.voice_to_voice_seconds", voice_to_voice_ms / 1000)
            metrics().voice_to_voice.record(voice_to_voice_ms)
        if interrupted:
            metrics().interruptions.add(1)
        span.end()

    # As a seams.TurnObserver: a span per turn, ended (and counted) when the turn is over for good.
    def turn_opened(self, turn) -> None:
        turn.span = self.start_turn(turn.number, turn.turn_id, turn.started_at)

    def turn_finished(self, turn) -> None:
        duration, interrupted, reason = turn.ended_as
        self.end_turn(turn.span, duration, interrupted, turn.latency_ms, reason)

    def said(self, role: str, text: str, interrupted: bool) -> None:
        pass

    def error(self, code: str, source: str) -> None:
        metrics().errors.add(1, {"code": code, "source": source})

    def end(self, reason: str) -> None:
        self.conversation.set_attribute("conversation.end_reason", reason)
        if reason == "REASON_ERROR":
            self.conversation.set_status(Status(StatusCode.ERROR, "session ended with an error"))
        self.conversation.end()
        metrics().active_sessions.add(-1)
