"""One bot reply: a Generate call streaming into a Synthesize call, both opened per turn.

Sentences go to TTS as soon as the LLM completes them, so the first sentence is spoken
while the LLM is still writing. Cancelling the task running `run()` cancels both calls
(that is the barge-in path); the spoken text is what reached the playout queue markers.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from voicemesh.orchestrator import events
from voicemesh.orchestrator.clients import ServiceClients
from voicemesh.orchestrator.config import first_clause_words
from voicemesh.orchestrator.context import ConversationContext
from voicemesh.orchestrator.seams import EventSink, HeldSink, ReplySink
from voicemesh.orchestrator.tools import ToolBroker
from voicemesh.orchestrator.tracing import metrics
from voicemesh.orchestrator.turn_events import Turn
from voicemesh.runtime import telemetry
from voicemesh.runtime.sentences import SentenceAggregator, clean_for_speech
from voicemesh.runtime.streams import write_or_status
from voicemesh.v1 import common_pb2, llm_pb2, orchestrator_pb2 as pb, tts_pb2


@dataclass
class ReplyCalls:
    """A reply's Generate and Synthesize calls. Opened while the final transcript is on its
    way, so call setup (headers, the services' handlers starting) is off the critical path."""

    llm: object
    tts: object

    @classmethod
    def open(cls, clients: ServiceClients, metadata: tuple[tuple[str, str], ...]) -> "ReplyCalls":
        return cls(llm=clients.llm.Generate(metadata=metadata), tts=clients.tts.Synthesize(metadata=metadata))

    def cancel(self) -> None:
        self.llm.cancel()
        self.tts.cancel()


def call_metadata(turn: Turn, speculative: bool) -> tuple[tuple[str, str], ...]:
    # Per-turn calls carry the turn's trace context, so their service spans join the turn.
    return telemetry.metadata_for(turn.span) + (("voicemesh-speculative", "1" if speculative else "0"),)


@dataclass
class ReplyEnv:
    """What every reply of a session shares."""

    clients: ServiceClients
    config: pb.SessionConfig
    output_format: common_pb2.AudioFormat
    bytes_per_second: int
    emit: EventSink  # sends a ConverseResponse to the caller now
    tools: ToolBroker
    context: ConversationContext


class EmptyReply(Exception):
    """The LLM ended its reply without a word to speak or a tool call (nothing at all, or only
    markdown or emoji, which the TTS drops): the user would hear nothing, so the turn ends as
    failed, with this as the reason (not as answered)."""

    code = "UNKNOWN"

    def __init__(self) -> None:
        super().__init__("the LLM ended its reply without a word to speak or a tool call (nothing, or only markdown "
                         "or emoji); "
                         "the user can say it again, or the prompt can be checked")


class BotReply:
    """Writes to `sink`: the Playout, or for a speculative reply the HeldSink in front of it."""

    def __init__(self, env: ReplyEnv, sink: ReplySink, turn: Turn, held: HeldSink | None = None):
        self.env = env
        self.clients = env.clients
        self.config = env.config
        self.output_format = env.output_format
        self.bytes_per_second = env.bytes_per_second
        self.emit = env.emit
        self.playout = sink
        self.turn = turn
        self.held = held
        self.speculative = held is not None
        self._llm_started = 0.0
        self._tts_text_sent_at: float | None = None

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.turn, self.speculative)

    async def say(self, text: str) -> None:
        """Speak fixed text (greeting, say, re-prompt): TTS only."""
        tts_call = self.clients.tts.Synthesize(metadata=self._metadata())
        try:
            await write_or_status(tts_call, self._tts_config())
            self._tts_text_sent_at = time.monotonic()
            self.turn.tts_characters += len(text)
            await write_or_status(tts_call, _piece(1, text))
            await tts_call.done_writing()
            await self._play(tts_call)
        finally:
            tts_call.cancel()

    def _tts_config(self) -> tts_pb2.SynthesizeRequest:
        return tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(
            voice=self.config.voice, format=self.output_format, language=self.config.language,
            session_id=self.config.session_id, turn_id=self.turn.turn_id))

    async def run(self, messages: list[llm_pb2.ChatMessage], calls: ReplyCalls | None = None) -> None:
        session_id = self.config.session_id
        calls = calls or ReplyCalls.open(self.clients, self._metadata())
        llm_call, tts_call = calls.llm, calls.tts
        self._llm_started = time.monotonic()
        try:
            chat = llm_pb2.ChatRequest(
                messages=messages, params=self.config.llm_params, session_id=session_id, turn_id=self.turn.turn_id,
                tools=self.config.tools.tools,
            )
            # The LLM request first: it is on the critical path; TTS is set up while the LLM thinks.
            # The request stream stays open: tool results go back on it (see _write_sentences).
            await write_or_status(llm_call, llm_pb2.GenerateRequest(chat=chat))
            await write_or_status(tts_call, self._tts_config())
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
        aggregator = SentenceAggregator(first_clause_words=first_clause_words(self.config))
        segment_id = 0
        first_delta = True
        recorded_ttfb = False  # the LLM's TTFB metric: recorded once the first delta's sentences (if any) are written
        calls: list[llm_pb2.ToolCall] = []
        tool_rounds = 0
        speakable = False  # a piece the TTS will voice: markdown or emoji alone is cleaned to nothing
        async for response in llm_call:
            kind = response.WhichOneof("response")
            if kind == "delta" and first_delta:
                first_delta = False
                self.turn.ttfb_ms["llm"] = (time.monotonic() - self._llm_started) * 1000
            if kind == "queued":
                self.turn.llm_queued += 1  # a busy LLM says so every few seconds: the watchdog waits on
            elif kind == "tool_call":
                calls.append(response.tool_call)
            elif kind == "awaiting_tool_results":
                await self._run_tools(llm_call, calls)
                calls, tool_rounds = [], tool_rounds + 1
            elif kind == "delta":
                try:
                    for sentence in aggregator.push(response.delta.text):
                        segment_id += 1
                        self._tts_text_sent_at = self._tts_text_sent_at or time.monotonic()
                        self.turn.tts_characters += len(sentence)  # counted before the write: a barge-in may cancel it
                        await write_or_status(tts_call, _piece(segment_id, sentence))
                        # The text cleaning after the write: the first sentence's write is on the critical path.
                        speakable = speakable or bool(clean_for_speech(sentence))
                finally:  # after the first delta's writes, or when a barge-in cancels one
                    if not recorded_ttfb:
                        recorded_ttfb = True
                        metrics().ttfb.record(self.turn.ttfb_ms["llm"], {"service": "llm"})
            elif kind == "done":
                usage = response.done.usage
                self.turn.llm_usage = (usage.input_tokens, usage.output_tokens)
        rest = aggregator.flush()
        if rest.strip():
            segment_id += 1
            self._tts_text_sent_at = self._tts_text_sent_at or time.monotonic()
            self.turn.tts_characters += len(rest)
            speakable = speakable or bool(clean_for_speech(rest))
            await write_or_status(tts_call, _piece(segment_id, rest))
        if not speakable and tool_rounds == 0 and not calls:
            raise EmptyReply()
        await llm_call.done_writing()
        await tts_call.done_writing()

    async def _run_tools(self, llm_call, calls: list[llm_pb2.ToolCall]) -> None:
        """The client runs the tools (in parallel); their results go back to the same LLM call."""
        if self.held is not None:  # never ask the client to run tools for a turn that may be dropped
            await self.held.released.wait()
        context = self.env.context
        context.add_tool_calls(calls)  # with IN_PROGRESS results until the answers come
        results = await self.env.tools.run(calls, self.turn.number)
        for result, _ in results:
            context.set_tool_result(result.tool_call_id, result.content)
            await write_or_status(llm_call, llm_pb2.GenerateRequest(tool_result=result))

    async def _play(self, tts_call) -> None:
        """Queue audio and 'spoken' markers for the caller, in order."""
        first = True
        number = self.turn.number
        async for response in tts_call:
            if response.HasField("audio"):
                received = time.perf_counter()
                arrived = time.monotonic() if first else 0.0
                chunk = response.audio.chunk
                message = events.bot_audio(chunk.data, chunk.offset_ms, number)
                self.playout.audio(message, len(chunk.data) / self.bytes_per_second, number)
                metrics().hop.record((time.perf_counter() - received) * 1000, {"direction": "outbound"})
                if first and self._tts_text_sent_at is not None:  # after the audio: it is on the critical path
                    self.turn.ttfb_ms["tts"] = (arrived - self._tts_text_sent_at) * 1000
                    metrics().ttfb.record(self.turn.ttfb_ms["tts"], {"service": "tts"})
                first = False
                await self.playout.room()  # past MAX_QUEUED_SECONDS, stop reading the TTS until it plays
            elif response.HasField("segment_done") and response.segment_done.spoken_text:
                text = response.segment_done.spoken_text
                self.playout.marker(lambda text=text: self._spoken(text))

    def _spoken(self, text: str) -> None:
        self.turn.spoken.append(text)
        self.emit(events.bot_text(text, self.turn.number))


def _piece(segment_id: int, text: str) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text=tts_pb2.TextPiece(segment_id=segment_id, text=text, end_of_segment=True))
