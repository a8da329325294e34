"""One bot reply: a Generate call streaming into a Synthesize call, both opened per turn.

Sentences go to TTS as soon as the LLM completes them, so the first sentence is spoken
while the LLM is still writing. Cancelling the task running `run()` cancels both calls
(that is the barge-in path); the spoken text is what reached the playout queue markers.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from voicemesh.orchestrator.clients import ServiceClients
from voicemesh.orchestrator.playout import Playout
from voicemesh.orchestrator.tracing import metrics
from voicemesh.runtime import telemetry
from voicemesh.runtime.sentences import SentenceAggregator
from voicemesh.v1 import common_pb2, llm_pb2, orchestrator_pb2 as pb, tts_pb2


@dataclass
class Turn:
    """Everything the session tracks about one turn."""

    number: int
    turn_id: str
    started_at: float = field(default_factory=time.monotonic)
    user_text: str = ""
    user_end_at: float | None = None  # wall time the end of user speech reached us
    first_audio_at: float | None = None
    spoken: list[str] = field(default_factory=list)  # bot text actually sent to the caller
    replying: bool = False
    ended: bool = False
    llm_usage: tuple[int, int] = (0, 0)
    speculation: "Speculation | None" = None  # a reply started at a pause, not yet confirmed
    span: object = None  # the turn's span (opentelemetry Span)
    finalize_sent_at: float | None = None

    @property
    def latency_ms(self) -> float:
        if self.user_end_at is None or self.first_audio_at is None:
            return 0.0
        return max(0.0, (self.first_audio_at - self.user_end_at) * 1000)


@dataclass
class Speculation:
    """A reply started on the transcript of a pause; its audio is held until the turn is confirmed."""

    text: str
    held: object  # HeldPlayout
    task: asyncio.Task


def same_words(a: str, b: str) -> bool:
    """Transcripts equal up to case and punctuation."""
    def words(text: str) -> list[str]:
        return [w.strip(".,!?;:\"'").lower() for w in text.split()]

    return words(a) == words(b)


class BotReply:
    def __init__(
        self,
        clients: ServiceClients,
        playout: Playout,
        turn: Turn,
        config: pb.SessionConfig,
        output_format: common_pb2.AudioFormat,
        bytes_per_second: int,
        emit,
        speculative: bool = False,
    ):
        self.clients = clients
        self.playout = playout
        self.turn = turn
        self.config = config
        self.output_format = output_format
        self.bytes_per_second = bytes_per_second
        self.emit = emit  # sends a ConverseResponse to the caller now
        self.speculative = speculative
        self._llm_started = 0.0
        self._tts_text_sent_at: float | None = None

    async def run(self, messages: list[llm_pb2.ChatMessage]) -> None:
        session_id = self.config.session_id
        # Per-turn calls carry the turn's trace context, so their service spans join the turn.
        metadata = telemetry.metadata_for(self.turn.span) + (("voicemesh-speculative", "1" if self.speculative else "0"),)
        tts_call = self.clients.tts.Synthesize(metadata=metadata)
        llm_call = self.clients.llm.Generate(metadata=metadata)
        self._llm_started = time.monotonic()
        try:
            await tts_call.write(
                tts_pb2.SynthesizeRequest(
                    config=tts_pb2.TtsConfig(
                        voice=self.config.voice,
                        format=self.output_format,
                        language=self.config.language,
                        session_id=session_id,
                        turn_id=self.turn.turn_id,
                    )
                )
            )
            chat = llm_pb2.ChatRequest(
                messages=messages, params=self.config.llm_params, session_id=session_id, turn_id=self.turn.turn_id
            )
            await llm_call.write(llm_pb2.GenerateRequest(chat=chat))
            await llm_call.done_writing()
            speaker = asyncio.ensure_future(self._play(tts_call))
            try:
                await self._write_sentences(llm_call, tts_call)
                await speaker
            finally:
                speaker.cancel()
        finally:
            llm_call.cancel()
            tts_call.cancel()

    async def _write_sentences(self, llm_call, tts_call) -> None:
        aggregator = SentenceAggregator()
        segment_id = 0
        first_delta = True
        async for response in llm_call:
            kind = response.WhichOneof("response")
            if kind == "delta" and first_delta:
                first_delta = False
                metrics().ttfb.record((time.monotonic() - self._llm_started) * 1000, {"service": "llm"})
            if kind == "delta":
                for sentence in aggregator.push(response.delta.text):
                    segment_id += 1
                    self._tts_text_sent_at = self._tts_text_sent_at or time.monotonic()
                    await tts_call.write(_piece(segment_id, sentence))
            elif kind == "done":
                usage = response.done.usage
                self.turn.llm_usage = (usage.input_tokens, usage.output_tokens)
        rest = aggregator.flush()
        if rest.strip():
            segment_id += 1
            self._tts_text_sent_at = self._tts_text_sent_at or time.monotonic()
            await tts_call.write(_piece(segment_id, rest))
        await tts_call.done_writing()

    async def _play(self, tts_call) -> None:
        """Queue audio and 'spoken' markers for the caller, in order."""
        seq = 0
        number = self.turn.number
        async for response in tts_call:
            if response.HasField("audio"):
                received = time.perf_counter()
                if seq == 0 and self._tts_text_sent_at is not None:
                    metrics().ttfb.record((time.monotonic() - self._tts_text_sent_at) * 1000, {"service": "tts"})
                chunk = response.audio.chunk
                message = pb.ConverseResponse(
                    audio=pb.BotAudio(chunk=common_pb2.AudioChunk(data=chunk.data, seq=seq, offset_ms=chunk.offset_ms), turn_number=number)
                )
                seq += 1
                self.playout.audio(message, len(chunk.data) / self.bytes_per_second, number)
                metrics().hop.record((time.perf_counter() - received) * 1000, {"direction": "outbound"})
            elif response.HasField("segment_done") and response.segment_done.spoken_text:
                text = response.segment_done.spoken_text
                self.playout.marker(lambda text=text: self._spoken(text))

    def _spoken(self, text: str) -> None:
        self.turn.spoken.append(text)
        self.emit(pb.ConverseResponse(bot_text=pb.BotText(text=text, turn_number=self.turn.number)))


def _piece(segment_id: int, text: str) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text=tts_pb2.TextPiece(segment_id=segment_id, text=text, end_of_segment=True))
