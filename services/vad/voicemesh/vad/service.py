"""The VAD service: a thin servicer over one VadProvider plus the shared segmenter, and the
Smart Turn model (one per process, provider-independent) for streams that ask for it."""
from __future__ import annotations

import bisect
import time

import grpc
import numpy as np

from voicemesh.runtime import telemetry
from voicemesh.runtime.audio import InboundAudio
from voicemesh.runtime.errors import FailedPrecondition, InvalidInput, first_message, stream_guard
from voicemesh.runtime.mux import MultiplexedCall
from voicemesh.runtime.server import ServicerBase, provider_service
from voicemesh.runtime.turn_defaults import MAX_SILENCE_LIMIT_SECS, MAX_SILENCE_SECS, PLAIN_STOP_SECS, SMART_TURN_STOP_SECS
from voicemesh.v1 import vad_pb2, vad_pb2_grpc
from voicemesh.vad.models import MODELS
from voicemesh.vad.providers.base import VadProvider
from voicemesh.vad.segmenter import SegmenterParams, SpeechSegmenter, window_volume
from voicemesh.vad.smart_turn import MODEL_NAME as SMART_TURN_MODEL
from voicemesh.vad.smart_turn import SmartTurnModel, TurnGate

PROVIDERS = {
    "silero": "voicemesh.vad.providers.silero:SileroVadProvider",
    "fake": "voicemesh.vad.providers.fake:FakeVadProvider",  # scripted, for tests and the bench
}
_DEFAULTS = SegmenterParams(stop_secs=PLAIN_STOP_SECS, max_silence_secs=MAX_SILENCE_SECS)


def segmenter_params(config: vad_pb2.VadConfig, smart_turn_available: bool) -> SegmenterParams:
    """Config values with zero meaning "default", range-checked. Smart Turn, unless the
    stream says otherwise, is on whenever this service has the model."""
    smart_turn = config.smart_turn if config.HasField("smart_turn") else smart_turn_available
    params = SegmenterParams(
        confidence=config.confidence or _DEFAULTS.confidence,
        start_secs=config.start_secs or _DEFAULTS.start_secs,
        stop_secs=config.stop_secs or (SMART_TURN_STOP_SECS if smart_turn else _DEFAULTS.stop_secs),
        min_volume=config.min_volume or _DEFAULTS.min_volume,
        smart_turn=smart_turn,
        smart_turn_threshold=config.smart_turn_threshold or _DEFAULTS.smart_turn_threshold,
        max_silence_secs=config.max_silence_secs or _DEFAULTS.max_silence_secs,
    )
    if not 0 < params.confidence <= 1 or not 0 <= params.min_volume <= 1:
        raise InvalidInput("Detect: confidence must be in (0, 1] and min_volume in [0, 1]")
    if not 0 < params.start_secs <= 5 or not 0 < params.stop_secs <= 10:
        raise InvalidInput("Detect: start_secs must be in (0, 5] and stop_secs in (0, 10]")
    if params.smart_turn and not 0 < params.smart_turn_threshold <= 1:
        raise InvalidInput("Detect: smart_turn_threshold must be in (0, 1]")
    if params.smart_turn and not params.stop_secs <= params.max_silence_secs <= MAX_SILENCE_LIMIT_SECS:
        raise InvalidInput(f"Detect: max_silence_secs must be at least stop_secs and at most {MAX_SILENCE_LIMIT_SECS:g}")
    # Without Smart Turn the segmenter still sizes its silence fallback from it: NaN or inf would fail there.
    if not 0 < params.max_silence_secs <= MAX_SILENCE_LIMIT_SECS:
        raise InvalidInput(f"Detect: max_silence_secs must be in (0, {MAX_SILENCE_LIMIT_SECS:g}]")
    return params


class VadServicer(ServicerBase, vad_pb2_grpc.VadServiceServicer):
    kind = "vad"
    provider: VadProvider
    smart_turn: SmartTurnModel | None = None

    async def startup(self) -> None:
        # Before SERVING, like the provider's model: no stream waits for it.
        self.smart_turn = await SmartTurnModel.load_if_available()
        await super().startup()

    async def shutdown(self) -> None:
        await super().shutdown()
        if self.smart_turn is not None:
            await self.smart_turn.close()

    async def Detect(self, request_iterator, context: grpc.aio.ServicerContext):
        async with stream_guard(context, "Detect"):
            async for response in self._detect(request_iterator):
                yield response

    async def DetectMany(self, request_iterator, context: grpc.aio.ServicerContext):
        async with stream_guard(context, "DetectMany"):
            self.require_ready()
            call = MultiplexedCall(
                self._detect, vad_pb2.DetectManyResponse, vad_pb2.DetectStreamEvent, "vad", "DetectMany", "Detect"
            )
            async for response in call.serve(request_iterator):
                yield response

    async def _detect(self, request_iterator):
        """One Detect stream (also each stream of DetectMany); raises StreamError on bad input."""
        self.require_ready()
        config = await first_message(request_iterator, "config", "Detect")
        inbound = InboundAudio(config.format, self.provider.sample_rate_hz, "Detect")
        params = segmenter_params(config, self.smart_turn is not None)
        if params.smart_turn and self.smart_turn is None:
            raise FailedPrecondition(
                "Detect: smart_turn is on but this VAD service has no Smart Turn model "
                "(install pipecat-ai --no-deps or set VOICEMESH_SMART_TURN_MODEL); turn smart_turn off"
            )
        segmenter = SpeechSegmenter(params, sample_rate_hz=self.provider.sample_rate_hz)
        gate = TurnGate(segmenter, self.smart_turn.score if params.smart_turn else None)
        stream = self.provider.open_stream()
        spans = _SegmentSpans(self.provider.sample_rate_hz)
        # The segmenter needs each window's volume; keep the samples not yet scored.
        pending = np.zeros(0, dtype=np.int16)
        pending_start = 0  # stream offset (samples) of pending[0]
        speech_started_ms = 0
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("request")
                if kind == "turn":
                    spans.turn(request.turn, speech_started_ms)
                    continue
                if kind == "config":
                    raise InvalidInput("Detect: config may only be sent once, as the first message")
                samples = inbound.convert(request.audio.data)
                spans.arrived(pending_start + len(pending) + len(samples))
                gate.append(samples)
                pending = np.concatenate((pending, samples))
                for result in await stream.process(samples):
                    end = result.end_offset_samples - pending_start
                    window = pending[max(0, end - 512) : end]
                    for event in await gate.push(result.end_offset_samples, result.probability, window_volume(window)):
                        if event.kind == "started":
                            speech_started_ms = event.offset_ms
                        else:
                            spans.stopped(event, speech_started_ms, params.smart_turn)
                        yield _to_response(event, speech_started_ms)
                    pending = pending[end:]
                    pending_start = result.end_offset_samples
        finally:
            spans.close()
            await stream.close()

    async def Info(self, request, context):
        info = self.service_info(input_rates=(0,))
        info.details["smart_turn"] = SMART_TURN_MODEL if self.smart_turn is not None else "unavailable"
        if self.smart_turn is not None:
            info.details.update(self.smart_turn.cpu.details(prefix="smart_turn_"))
        return vad_pb2.VadServiceInfoResponse(info=info)


class _SegmentSpans:
    """A `vad` span per speech segment, parented by the turn it opened (the orchestrator sends
    the TurnContext after SpeechStarted). It starts when the segment's first audio arrived
    here and ends when the segment's end was decided."""

    def __init__(self, rate_hz: int):
        self.rate_hz = rate_hz
        self.arrivals: list[tuple[int, int]] = []  # (end offset in samples, wall time ns)
        self.span = None

    def arrived(self, end_offset: int) -> None:
        self.arrivals.append((end_offset, time.time_ns()))
        if len(self.arrivals) > 4000:  # a few minutes is plenty to date a segment's start
            del self.arrivals[:2000]

    def _arrival_ns(self, offset_ms: int) -> int:
        sample = offset_ms * self.rate_hz // 1000
        index = bisect.bisect_left(self.arrivals, (sample, 0))
        return self.arrivals[index][1] if index < len(self.arrivals) else time.time_ns()

    def turn(self, context, speech_started_ms: int) -> None:
        if not context.trace.traceparent:
            return
        self.close()
        parent = telemetry.context_from_traceparent(context.trace.traceparent, context.trace.tracestate)
        self.span = telemetry.tracer().start_span(
            "vad", context=parent, start_time=self._arrival_ns(speech_started_ms),
            attributes={"turn.id": context.turn_id, "vad.speech_start_ms": speech_started_ms},
        )

    def stopped(self, event, started_ms: int, smart_turn: bool) -> None:
        if self.span is not None:
            self.span.set_attributes({"vad.speech_end_ms": event.offset_ms, "vad.probability": event.probability,
                                      "vad.duration_ms": max(0, event.offset_ms - started_ms)})
            if smart_turn:
                self.span.set_attributes({"vad.end_of_turn_probability": event.end_of_turn_probability,
                                          "vad.silence_fallback": event.silence_fallback})
            self.span.end()
            self.span = None

    def close(self) -> None:
        if self.span is not None:
            self.span.set_attribute("cancelled", True)
            self.span.end()
            self.span = None


def _to_response(event, speech_started_ms: int) -> vad_pb2.DetectResponse:
    if event.kind == "started":
        return vad_pb2.DetectResponse(
            speech_started=vad_pb2.SpeechStarted(offset_ms=event.offset_ms, probability=event.probability)
        )
    return vad_pb2.DetectResponse(
        speech_stopped=vad_pb2.SpeechStopped(
            offset_ms=event.offset_ms,
            probability=event.probability,
            duration_ms=max(0, event.offset_ms - speech_started_ms),
            end_of_turn_probability=event.end_of_turn_probability,
            silence_fallback=event.silence_fallback,
        )
    )


DEFINITION = provider_service("vad", VadServicer, vad_pb2, "VadService", PROVIDERS, models=MODELS)
