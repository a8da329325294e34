"""The STT service: a thin servicer over one SttProvider stream per call."""
from __future__ import annotations

import asyncio
import time

import grpc

from voicemesh.runtime import telemetry
from voicemesh.runtime.audio import InboundAudio
from voicemesh.runtime.errors import InvalidInput, first_message, stream_guard
from voicemesh.runtime.server import ServicerBase, provider_service
from voicemesh.runtime.streams import with_reader
from voicemesh.stt.models import MODELS
from voicemesh.stt.providers.base import SttEndOfUtterance, SttProvider, SttStream, SttStreamConfig, SttTranscript
from voicemesh.v1 import stt_pb2, stt_pb2_grpc

PROVIDERS = {
    "whisper": "voicemesh.stt.providers.whisper:WhisperSttProvider",
    "riva": "voicemesh.stt.providers.riva:RivaSttProvider",
    "aws": "voicemesh.stt.providers.aws_transcribe:TranscribeSttProvider",
    "azure": "voicemesh.stt.providers.azure:AzureSttProvider",
    "deepgram": "voicemesh.stt.providers.deepgram:DeepgramSttProvider",
    "fake": "voicemesh.stt.providers.fake:FakeSttProvider",  # scripted, for tests and the bench
}
PROVIDER_RATE_HZ = 16000  # every provider is fed PCM16 mono at 16 kHz
# A cancelled call shows the end of the requests first and its cancellation a loop turn later
# (~0.2 ms): the end-of-requests final waits this long, so that a caller who has gone does not
# get its trailing audio decoded (3-4 s of audio, ~1 s of CPU, after every session).
END_GRACE_S = 0.05


class SttServicer(ServicerBase, stt_pb2_grpc.SttServiceServicer):
    kind = "stt"
    provider: SttProvider

    async def Recognize(self, request_iterator, context: grpc.aio.ServicerContext):
        async with stream_guard(context, "Recognize"):
            self.require_ready()
            config = await first_message(request_iterator, "config", "Recognize")
            inbound = InboundAudio(config.format, PROVIDER_RATE_HZ, "Recognize")
            stream = self.provider.open_stream(
                SttStreamConfig(
                    sample_rate_hz=PROVIDER_RATE_HZ, language=config.language,
                    interim_results=config.interim_results, pause_transcripts=config.pause_transcripts,
                    session_id=config.session_id,
                )
            )
            spans = _TurnSpans(config.language or self.provider_info().details.get("language", ""))
            answered = False
            try:
                async for result in with_reader(_feed(request_iterator, inbound, stream, spans), stream.results()):
                    spans.result(result)
                    yield _to_response(result)
                answered = True
            finally:
                spans.close()
                # Cancelled or failed: nobody reads what is still pending, so it is not decoded.
                await (stream.close() if answered else stream.abort())

    async def Info(self, request, context):
        return stt_pb2.SttServiceInfoResponse(info=self.service_info(input_rates=(0,)))


class _TurnSpans:
    """One `stt` span per turn on a session-long stream, parented by the turn's TurnContext:
    from the turn's start to its final transcript."""

    def __init__(self, language: str):
        self.language = language
        self.open: dict[str, tuple[object, list[float]]] = {}  # turn id -> (span, [finalize time])

    def turn_start(self, context) -> None:
        if context.turn_id in self.open or not context.trace.traceparent:
            return  # the user resumed within the same turn: one span covers it
        parent = telemetry.context_from_traceparent(context.trace.traceparent, context.trace.tracestate)
        span = telemetry.tracer().start_span("stt", context=parent, attributes={"turn.id": context.turn_id})
        self.open[context.turn_id] = (span, [])

    def finalize(self, turn_id: str) -> None:
        if turn_id in self.open:
            self.open[turn_id][1].append(time.monotonic())

    def result(self, result) -> None:
        if not (isinstance(result, SttTranscript) and result.is_final) or result.turn_id not in self.open:
            return
        span, finalized = self.open.pop(result.turn_id)
        ttfb = time.monotonic() - finalized[-1] if finalized else None
        telemetry.set_attributes(span, {
            "transcript": telemetry.content(result.text), "is_final": True, "confidence": result.confidence,
            "language": result.language or self.language, "metrics.ttfb": ttfb,
        })
        span.end()

    def close(self) -> None:
        for span, _ in self.open.values():
            span.set_attribute("cancelled", True)
            span.end()
        self.open.clear()


async def _feed(request_iterator, inbound: InboundAudio, stream: SttStream, spans: _TurnSpans) -> None:
    """Route requests to the provider stream; the end of the requests (a half-close: the
    client still reads) finalizes what is left and closes recognition."""
    async for request in request_iterator:
        kind = request.WhichOneof("request")
        if kind == "audio":
            samples = inbound.convert(request.audio.data)
            if samples.size:
                await stream.push_audio(samples.tobytes())
        elif kind == "turn_start":
            spans.turn_start(request.turn_start)
            await stream.turn_start(request.turn_start.turn_id, request.turn_start.audio_offset_ms)
        elif kind == "finalize":
            spans.finalize(request.finalize.turn_id)
            await stream.finalize()
        elif kind == "config":
            raise InvalidInput("Recognize: config may only be sent once, as the first message")
    await asyncio.sleep(END_GRACE_S)  # cancelled here if the caller has gone (see END_GRACE_S)
    await stream.finalize()
    await stream.close()


def _to_response(result) -> stt_pb2.RecognizeResponse:
    if isinstance(result, SttEndOfUtterance):
        return stt_pb2.RecognizeResponse(
            end_of_utterance=stt_pb2.EndOfUtterance(offset_ms=result.offset_ms, turn_id=result.turn_id)
        )
    transcript = stt_pb2.Transcript(
        text=result.text,
        is_final=result.is_final,
        stability=result.stability,
        confidence=result.confidence,
        language=result.language,
        start_ms=result.start_ms,
        end_ms=result.end_ms,
        turn_id=result.turn_id,
        at_pause=result.at_pause,
    )
    for word in result.words:
        transcript.words.add(text=word.text, start_ms=word.start_ms, end_ms=word.end_ms, confidence=word.confidence)
    return stt_pb2.RecognizeResponse(transcript=transcript)


DEFINITION = provider_service("stt", SttServicer, stt_pb2, "SttService", PROVIDERS, models=MODELS)
