"""The TTS service: text pieces in, sentence-by-sentence audio out, tagged by segment."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict

import grpc
import numpy as np

from voicemesh.runtime import telemetry
from voicemesh.runtime.audio import OutboundAudio, validate_format
from voicemesh.runtime.errors import InvalidInput, first_message, stream_guard
from voicemesh.runtime.sentences import SentenceAggregator, clean_for_speech
from voicemesh.runtime.server import ServicerBase, provider_service
from voicemesh.runtime.streams import with_reader
from voicemesh.tts.providers.base import SynthesisRequest, TtsProvider, WordMark
from voicemesh.v1 import common_pb2, tts_pb2, tts_pb2_grpc

PROVIDERS = {
    "hibari": "voicemesh.tts.providers.hibari:HibariTtsProvider",
    "espeak": "voicemesh.tts.providers.espeak:EspeakTtsProvider",
    "riva": "voicemesh.tts.providers.riva:RivaTtsProvider",
    "polly": "voicemesh.tts.providers.polly:PollyTtsProvider",
    "azure": "voicemesh.tts.providers.azure:AzureTtsProvider",
    "elevenlabs": "voicemesh.tts.providers.elevenlabs:ElevenLabsTtsProvider",
    "cartesia": "voicemesh.tts.providers.cartesia:CartesiaTtsProvider",
    "fake": "voicemesh.tts.providers.fake:FakeTtsProvider",  # scripted, for tests and the bench
}
MAX_TEXT_CHARS = 20_000  # per call; a turn's reply is far shorter


class _Sentence:
    """A unit of work for the synthesis loop: a sentence, and whether it closes its segment."""

    __slots__ = ("segment_id", "text", "ends_segment")

    def __init__(self, segment_id: int, text: str, ends_segment: bool):
        self.segment_id, self.text, self.ends_segment = segment_id, text, ends_segment


class TtsServicer(ServicerBase, tts_pb2_grpc.TtsServiceServicer):
    kind = "tts"
    provider: TtsProvider

    async def Synthesize(self, request_iterator, context: grpc.aio.ServicerContext):
        async with stream_guard(context, "Synthesize"):
            self.require_ready()
            config = await first_message(request_iterator, "config", "Synthesize")
            validate_format(config.format, "Synthesize: format")
            voice = config.voice
            voices = self.provider.voices()
            if voice and voices and voice not in voices:
                listed = ", ".join(voices[:20]) + (f" and {len(voices) - 20} more (see Info)" if len(voices) > 20 else "")
                raise InvalidInput(f"Synthesize: unknown voice {voice!r}; available: {listed}")
            speed = config.speed or 1.0
            if not 0.5 <= speed <= 2.0:
                raise InvalidInput(f"Synthesize: speed {speed} is outside 0.5-2.0")
            work: asyncio.Queue[_Sentence | None] = asyncio.Queue()
            request = SynthesisRequest(text="", voice=voice, language=config.language, speed=speed)
            metadata = context.invocation_metadata()
            attributes = {
                "voice_id": voice or self.provider_info().details.get("voice", ""), "session.id": config.session_id,
                "turn.id": config.turn_id, "speculative": telemetry.is_speculative(metadata),
            }
            with telemetry.service_span("tts", telemetry.context_from_metadata(metadata), attributes) as span:
                span.set_attribute("interrupted", True)  # until the last segment is done
                speech = self._speak(work, config.format, request, span)
                async for response in with_reader(_read_text(request_iterator, work), speech):
                    yield response
                span.set_attribute("interrupted", False)

    async def _speak(self, work: asyncio.Queue, wire_format: common_pb2.AudioFormat, base: SynthesisRequest, span):
        clock = _AudioClock()
        spoken: dict[int, list[str]] = {}
        words: dict[int, list[tts_pb2.SpokenWord]] = {}  # from providers that report word boundaries
        all_spoken: list[str] = []
        first_text_at: float | None = None
        while (sentence := await work.get()) is not None:
            text = clean_for_speech(sentence.text)
            segment = sentence.segment_id
            if text:
                spoken.setdefault(segment, []).append(text)
                all_spoken.append(text)
                telemetry.set_attributes(span, {"text": telemetry.content(" ".join(all_spoken)),
                                                "metrics.character_count": sum(len(t) for t in all_spoken)})
                first_text_at = first_text_at or time.monotonic()
                # One resampler per sentence, flushed at its end, so no audio is held back.
                outbound = OutboundAudio(wire_format, self.provider.sample_rate_hz, "Synthesize")
                request = SynthesisRequest(text=text, voice=base.voice, language=base.language, speed=base.speed)
                sentence_start_ms = clock.segment_ms.get(segment, 0.0)  # word times are the segment's
                held = None  # one chunk is held back so the resampler's tail joins the last one
                # aclosing: a cancelled call stops the provider at once (kills espeak, frees hibari).
                async with contextlib.aclosing(self.provider.synthesize(request)) as audio:
                    async for pcm in audio:
                        if isinstance(pcm, WordMark):
                            start_ms = int(sentence_start_ms + pcm.start_ms)
                            words.setdefault(segment, []).append(tts_pb2.SpokenWord(text=pcm.text, start_ms=start_ms))
                            continue
                        if held is not None and (data := outbound.convert(np.frombuffer(held, dtype="<i2"))):
                            yield clock.chunk(segment, data, outbound.bytes_per_second())
                        if clock.seq == 0 and held is None:
                            span.set_attribute("metrics.ttfb", time.monotonic() - first_text_at)
                        held = pcm
                if held is not None and (data := outbound.convert(np.frombuffer(held, dtype="<i2"), last=True)):
                    yield clock.chunk(segment, data, outbound.bytes_per_second())
            if sentence.ends_segment:
                yield tts_pb2.SynthesizeResponse(
                    segment_done=tts_pb2.SegmentDone(
                        segment_id=segment,
                        spoken_text=" ".join(spoken.pop(segment, [])),
                        audio_duration_ms=int(clock.segment_ms.pop(segment, 0.0)),
                        words=words.pop(segment, []),
                    )
                )

    async def Info(self, request, context):
        info = self.service_info(output_rates=(0,))
        return tts_pb2.TtsServiceInfoResponse(info=info, voices=self.provider.voices())


class _AudioClock:
    """Numbers the call's audio chunks and keeps stream and per-segment durations."""

    def __init__(self) -> None:
        self.seq = 0
        self.offset_ms = 0.0
        self.segment_ms: dict[int, float] = {}

    def chunk(self, segment_id: int, data: bytes, bytes_per_second: int) -> tts_pb2.SynthesizeResponse:
        chunk = common_pb2.AudioChunk(data=data, seq=self.seq, offset_ms=int(self.offset_ms))
        duration_ms = len(data) * 1000 / bytes_per_second
        self.seq += 1
        self.offset_ms += duration_ms
        self.segment_ms[segment_id] = self.segment_ms.get(segment_id, 0.0) + duration_ms
        return tts_pb2.SynthesizeResponse(audio=tts_pb2.SegmentAudio(segment_id=segment_id, chunk=chunk))


async def _read_text(request_iterator, work: asyncio.Queue) -> None:
    """Split incoming text into sentences per segment; complete sentences are queued at once."""
    open_segments: OrderedDict[int, SentenceAggregator] = OrderedDict()
    total_chars = 0

    def close_all() -> None:
        for segment_id, aggregator in open_segments.items():
            work.put_nowait(_Sentence(segment_id, aggregator.flush(), True))
        open_segments.clear()

    async for request in request_iterator:
        kind = request.WhichOneof("request")
        if kind == "text":
            piece = request.text
            total_chars += len(piece.text)
            if total_chars > MAX_TEXT_CHARS:
                raise InvalidInput(f"Synthesize: more than {MAX_TEXT_CHARS} characters of text in one call")
            aggregator = open_segments.setdefault(piece.segment_id, SentenceAggregator())
            for sentence in aggregator.push(piece.text):
                work.put_nowait(_Sentence(piece.segment_id, sentence, False))
            if piece.end_of_segment:
                work.put_nowait(_Sentence(piece.segment_id, aggregator.flush(), True))
                del open_segments[piece.segment_id]
        elif kind == "flush":
            close_all()
        elif kind == "config":
            raise InvalidInput("Synthesize: config may only be sent once, as the first message")
    close_all()
    work.put_nowait(None)


DEFINITION = provider_service("tts", TtsServicer, tts_pb2, "TtsService", PROVIDERS)
