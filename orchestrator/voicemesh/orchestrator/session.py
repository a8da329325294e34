"""One conversation: a pipeline of stages plus one turn controller.

Stages (the data path): caller audio -> CallerAudio -> session-long VAD and STT streams;
BotReply per turn: LLM -> sentences -> TTS -> Playout -> caller. The control plane is the
TurnController (turns.py), behind the session's lifecycle rules (lifecycle.py: idle, End,
Cancel): the Session feeds them what the streams, the client, the replies and the timers
report (turn_events), and carries out the effects they return, in order (effects.py). Every
stage writes caller events through `emit`, one queue the Converse handler drains, so the
caller sees one ordered stream. Tracing and the recorder observe the turn lifecycle.

Faults (docs/reliability.md): a VAD or STT call that fails (its replica died: UNAVAILABLE,
a reset, a normal end) or hangs (a write stuck, a final given up) is reopened through the same
channel (behind Envoy: on another replica) by forwarding.StreamKeeper, at most REOPEN_ATTEMPTS
times per outage, and the turn in progress is given to the new call again from the audio kept.
The client gets a non-fatal Error once the new call has held REOPEN_CONFIRM_S, or a fatal one
when the attempts run out. Limits (SessionLimits): caller audio too far ahead of real time, or
responses the client does not read, end this session alone with RESOURCE_EXHAUSTED.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass

import grpc
import numpy as np

from voicemesh.orchestrator import events, turn_events as ev
from voicemesh.orchestrator.clients import SerialStream, ServiceClients
from voicemesh.orchestrator.config import DEFAULT_SYSTEM_PROMPT, session_formats, smart_turn_and_stop_secs, validate
from voicemesh.orchestrator.context import ConversationContext
from voicemesh.orchestrator.effects import EffectRunner
from voicemesh.orchestrator.forwarding import CallerAudio, StreamFailed, StreamKeeper, StreamLink
from voicemesh.orchestrator.playout import Playout
from voicemesh.orchestrator.reply import ReplyEnv
from voicemesh.orchestrator.seams import TurnObserver
from voicemesh.orchestrator.tools import ToolBroker
from voicemesh.orchestrator.tracing import SessionTracing, metrics
from voicemesh.orchestrator.lifecycle import SessionLifecycle
from voicemesh.runtime.audio import InboundAudio, OutboundAudio
from voicemesh.runtime.errors import FailedPrecondition, InvalidInput, ResourceExhausted
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb, stt_pb2, vad_pb2

log = logging.getLogger("voicemesh.session")
PIPELINE_RATE_HZ = 16000  # the orchestrator feeds VAD and STT PCM16 mono at this rate
TICK_S = 0.1  # how often the session's timers are checked
DEFAULT_TOOL_TIMEOUT_S = 10.0
DTMF_DIGITS = set("0123456789*#ABCD")
def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r}: expected a number >= 0")
    return value


@dataclass(frozen=True)
class SessionLimits:
    """What one session may hold (docs/reliability.md); 0 turns a limit off."""

    queue_bytes: int = 1 << 20  # responses waiting for a client that does not read (about 20 s of bot audio)
    audio_ahead_s: float = 10.0  # caller audio received ahead of real time
    # The LLM context window when the config sets none (context.max_messages 0): a long call
    # must not grow its requests, and its memory, without end, nor overflow the embedded
    # model's 4,096-token context (about 20 exchanges here plus the system prompt).
    context_messages: int = 40

    @classmethod
    def from_env(cls) -> "SessionLimits":
        return cls(queue_bytes=int(_env_number("VOICEMESH_SESSION_QUEUE_BYTES", cls.queue_bytes)),
                   audio_ahead_s=_env_number("VOICEMESH_MAX_AUDIO_AHEAD_SECS", cls.audio_ahead_s),
                   context_messages=int(_env_number("VOICEMESH_CONTEXT_MAX_MESSAGES", cls.context_messages)))


class Session(EffectRunner, StreamKeeper):
    def __init__(self, config: pb.SessionConfig, clients: ServiceClients, client_metadata=(), clock=time.monotonic,
                 limits: SessionLimits | None = None):
        self.config = pb.SessionConfig()
        self.config.CopyFrom(config)
        self.config.session_id = config.session_id or uuid.uuid4().hex
        self.input_format, self.output_format = session_formats(config)
        validate(config)
        self.clock = clock
        self.inbound = InboundAudio(self.input_format, PIPELINE_RATE_HZ, "Converse", max_channels=2)
        outbound = OutboundAudio(self.output_format, self.output_format.sample_rate_hz, "Converse")
        self.bytes_per_second = outbound.bytes_per_second()
        self.clients = clients
        self.events: asyncio.Queue[pb.ConverseResponse | None] = asyncio.Queue()
        self.limits = limits or SessionLimits()
        self.queued_bytes = 0  # of the responses in self.events (the Converse handler calls delivered())
        self.peak_queued_bytes = 0
        self.overflow: str | None = None  # why the session was ended for a client that does not read
        self.on_overflow = lambda message: None  # set by the Converse handler: ends the call with RESOURCE_EXHAUSTED
        self._ahead_ms, self._audio_at = 0.0, None  # caller audio ahead of real time (a leaky bucket)
        self._outages = {}  # kind -> forwarding.Outage while a stream is being reopened
        self._skip_vad_start = False  # a reopened VAD hears the speech in progress start again
        self.controller = SessionLifecycle(self.config, clock())
        self.playout = Playout(self._send_bot_audio, on_first_audio=lambda number: self.feed(ev.ReplyFirstAudio(number)))
        self.context = ConversationContext(config.system_prompt or DEFAULT_SYSTEM_PROMPT,
                                           config.context.max_messages or self.limits.context_messages)
        self.tools = ToolBroker(self.emit, config.tools.timeout_secs or DEFAULT_TOOL_TIMEOUT_S,
                                on_change=lambda in_progress: self.feed(ev.ToolsChanged(in_progress)))
        self.reply_env = ReplyEnv(clients, self.config, self.output_format, self.bytes_per_second, self.emit, self.tools,
                                  self.context)
        self.recorder = _recorder(config, self.emit, self.output_format)
        self.tracing = SessionTracing(self.session_id, client_metadata, dict(config.metadata))
        self.observers: list[TurnObserver] = [self.tracing, *([self.recorder] if self.recorder else [])]
        EffectRunner.__init__(self)

    @property
    def session_id(self) -> str:
        return self.config.session_id

    @property
    def turn_count(self) -> int:
        return self.controller.turns.turn_count

    @property
    def awaiting(self) -> dict:
        """Turns that ended before their final transcript came, by turn id."""
        return self.controller.turns.awaiting

    def emit(self, message: pb.ConverseResponse) -> None:
        if self.overflow is not None:
            return  # the call is being ended: nobody will read this
        self.events.put_nowait(message)
        self.queued_bytes += message.ByteSize()
        self.peak_queued_bytes = max(self.peak_queued_bytes, self.queued_bytes)
        if self.limits.queue_bytes and self.queued_bytes > self.limits.queue_bytes:
            self._overflowed()

    def delivered(self, message: pb.ConverseResponse) -> None:
        """The Converse handler has written `message` to the client."""
        self.queued_bytes -= message.ByteSize()

    def _overflowed(self) -> None:
        self.overflow = (f"Converse: the client is not reading its responses: {self.queued_bytes // 1024} KiB are waiting "
                         f"(the limit is VOICEMESH_SESSION_QUEUE_BYTES={self.limits.queue_bytes}); read the stream as it "
                         "comes, or open a new session")
        log.warning("session %s ended: %s", self.session_id, self.overflow)
        while not self.events.empty():  # what waits will never be read: free it now
            self.events.get_nowait()
        self.queued_bytes = 0
        self.close(pb.SessionEnded.REASON_ERROR)
        self.on_overflow(self.overflow)

    def _send_bot_audio(self, message: pb.ConverseResponse) -> None:
        self.reply_progress()
        if self.recorder:
            self.recorder.bot_audio(message.audio.chunk.data, time.monotonic())
        self.emit(message)

    def close(self, reason: int) -> None:
        """Ask the session to stop with `reason` (first caller wins)."""
        if not self._closed.done():
            self._closed.set_result(reason)

    # ---- lifecycle -------------------------------------------------------------------
    async def run(self, request_iterator) -> None:
        """Drive the session until it ends; events go to self.events, then None."""
        self._closed = asyncio.get_running_loop().create_future()
        self.vad_call = StreamLink("vad", self._open_call("vad"), PIPELINE_RATE_HZ)
        self.stt_call = StreamLink("stt", self._open_call("stt"), PIPELINE_RATE_HZ)
        # The least stop wait the VAD may use (taking 0.2 s where it turns out 0.8 only makes
        # the urgent frames start early, which costs writes, not latency).
        stop_ms = round(smart_turn_and_stop_secs(self.config)[1] * 1000)
        self.caller_audio = CallerAudio(self.vad_call, self.stt_call, PIPELINE_RATE_HZ, stop_ms)
        tasks: list[asyncio.Task] = []
        try:
            await self._open_streams()
            self.emit(events.session_started(self.session_id, self.output_format))
            tasks = [asyncio.create_task(coro) for coro in (
                self._read_caller(request_iterator), self._keep(self.vad_call, self._on_vad),
                self._keep(self.stt_call, self._on_stt), self.playout.run(), self._watch())]
            greeting = self.config.greeting
            if greeting.WhichOneof("greeting"):
                self.feed(ev.Say(text=greeting.text, instruction=greeting.generate_instruction or None))
            pending = {*tasks, self._closed}
            while not self._closed.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not self._closed and not task.cancelled() and task.exception() is not None:
                        raise task.exception()
            reason = self._closed.result()
        except StreamFailed as err:
            log.warning("session %s: %s failed: %s %s", self.session_id, err.source, err.code, err.details)
            self.tracing.error(err.code, err.source)
            self.emit(events.error(err.code, f"{err.source} service: {err.details}", err.source, fatal=True))
            reason = pb.SessionEnded.REASON_ERROR
        except grpc.aio.AioRpcError as err:  # a call outside the VAD and STT streams (they raise StreamFailed)
            log.warning("session %s: llm/tts failed: %s", self.session_id, err.details())
            self.tracing.error(err.code().name, "llm/tts")
            self.emit(events.error(err.code().name, f"llm/tts service: {err.details()}", "llm/tts", fatal=True))
            reason = pb.SessionEnded.REASON_ERROR
        finally:
            for task in tasks:
                task.cancel()
            self.cancel_replies()
            self.vad_call.cancel()
            self.stt_call.cancel()
            self.feed(ev.SessionClosing())  # a turn in flight gets its TurnEnded (REASON_SESSION_ENDED)
            self.cancel_timers()
            self.tools.cancel_all("session ended")
            if self.recorder:
                self.recorder.close()
            failure = sys.exc_info()[0]
            if failure is not None:  # bad input (the caller gets the status) or the call went away
                self.tracing.end("REASON_CANCELLED" if issubclass(failure, asyncio.CancelledError) else "REASON_ERROR")
        self.tracing.end(pb.SessionEnded.Reason.Name(reason))
        self.emit(events.session_ended(reason))
        self.events.put_nowait(None)

    async def _open_streams(self) -> None:
        await self.vad_call.write(self._stream_config("vad"))
        await self.stt_call.write(self._stream_config("stt"))

    def _open_call(self, kind: str):
        """A new VAD or STT call (at the start, and for each reopen)."""
        return self.clients.open_vad_stream() if kind == "vad" else SerialStream(self.clients.stt.Recognize())

    def _stream_config(self, kind: str):
        stream_format = common_pb2.AudioFormat(
            encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=PIPELINE_RATE_HZ, channels=1)
        if kind == "stt":
            return stt_pb2.RecognizeRequest(config=stt_pb2.SttConfig(
                format=stream_format, language=self.config.language, interim_results=self.config.interim_transcripts,
                pause_transcripts=True, session_id=self.session_id))
        vad, turn = self.config.vad, self.config.turn
        # Unset smart_turn and stop_secs stay unset: the VAD service knows whether it has the
        # model and picks stop_secs to match (config.smart_turn_and_stop_secs says which).
        return vad_pb2.DetectRequest(config=vad_pb2.VadConfig(
            format=stream_format, confidence=vad.confidence, start_secs=vad.start_secs,
            stop_secs=vad.stop_secs, min_volume=vad.min_volume, session_id=self.session_id,
            smart_turn=turn.smart_turn if turn.HasField("smart_turn") else None,
            smart_turn_threshold=turn.smart_turn_threshold, max_silence_secs=turn.max_silence_secs))

    # ---- caller input ----------------------------------------------------------------
    async def _read_caller(self, request_iterator) -> None:
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "config":
                raise InvalidInput("Converse: config may only be sent once, as the first message")
            if self.controller.ending and kind in ("audio", "text"):
                raise FailedPrecondition(f"Converse: {kind} sent after end; the session is ending, open a new one")
            if kind == "audio":
                received = time.perf_counter()
                samples = self.inbound.convert(request.audio.data)
                self._pace(len(samples))
                await self._forward_audio(samples)
                metrics().hop.record((time.perf_counter() - received) * 1000, {"direction": "inbound"})
            elif kind == "text":
                if not request.text.text.strip():
                    raise InvalidInput("Converse: text input is empty")
                self.feed(ev.TypedText(request.text.text))
            elif kind == "dtmf":
                if request.dtmf.digit not in DTMF_DIGITS:
                    raise InvalidInput(f"Converse: dtmf digit {request.dtmf.digit!r} is not one of 0-9, *, #, A-D")
                self.feed(ev.Dtmf(request.dtmf.digit))
            elif kind == "tool_result":
                self.feed(ev.ClientActivity())
                self.tools.resolve(request.tool_result)
            elif kind == "control":
                self.feed(ev.ClientActivity())
                if await self._control(request.control) == "cancel":
                    return
        if not self.controller.ending:  # the caller went away without End: that is a cancel
            self.close(pb.SessionEnded.REASON_CANCELLED)

    async def _control(self, control: pb.SessionControl) -> str:
        action = control.WhichOneof("action")
        if action == "cancel":
            self.feed(ev.Cancel())
        elif action == "end" and not self.controller.ending:
            await self.caller_audio.flush()  # speech still in progress ends with the audio received
            received_ms = self.caller_audio.received_ms
            await self.feed_async(ev.End(received_ms, self.caller_audio.arrival_time(received_ms)))
        elif action == "say":
            if not control.say.text.strip():
                raise InvalidInput("Converse: say.text is empty")
            self.feed(ev.Say(text=control.say.text))
        elif action == "interrupt":
            self.feed(ev.Interrupt())
        elif action == "mute":
            self.feed(ev.Mute(control.mute.muted))
        elif action == "append_context":
            self.context.append(list(control.append_context.messages))
            if control.append_context.run_llm:
                self.feed(ev.Say(instruction=None))  # reply to the context as it now stands
        elif action == "replace_context":
            self.context.replace(list(control.replace_context.messages))
        return action or ""

    async def _watch(self) -> None:
        """Session timers: idle timeout, user-idle re-prompts, maximum duration."""
        while not self._closed.done():
            await asyncio.sleep(TICK_S)
            if self.recorder:
                self.recorder.advance()  # silent stretches of a text-only session stream out too
            self.feed(ev.Tick())
            self._confirm_reopened()
            self.check_reply()

    def _pace(self, samples: int) -> None:
        """Caller audio may run ahead of real time by audio_ahead_s at most (a leaky bucket: a
        burst after a network stall is fine, a client streaming a file at full speed is not)."""
        now = time.monotonic()
        elapsed_ms = 0.0 if self._audio_at is None else (now - self._audio_at) * 1000
        self._audio_at = now
        self._ahead_ms = max(0.0, self._ahead_ms - elapsed_ms) + samples * 1000 / PIPELINE_RATE_HZ
        limit = self.limits.audio_ahead_s
        if limit and self._ahead_ms > limit * 1000:
            raise ResourceExhausted(f"Converse: caller audio arrives faster than real time ({self._ahead_ms / 1000:.1f} s "
                                    f"ahead; the limit is VOICEMESH_MAX_AUDIO_AHEAD_SECS={limit:g}); send audio at "
                                    "real-time pace")

    async def _forward_audio(self, samples: np.ndarray) -> None:
        if self.recorder:
            self.recorder.user_audio(samples, time.monotonic())
        # Muted: VAD and STT get silence, so stream offsets stay aligned with real time.
        turns = self.controller.turns
        await self.caller_audio.push(np.zeros_like(samples) if turns.muted() else samples, turns.user_speaking)

    # ---- VAD and STT -----------------------------------------------------------------
    async def _on_vad(self, response: vad_pb2.DetectResponse) -> None:
        speaking = self.controller.turns.user_speaking
        if response.HasField("speech_started"):
            if self._skip_vad_start and speaking:  # the replayed start of the speech in progress
                self._skip_vad_start = False
                return
            offset_ms = self.vad_call.session_ms(response.speech_started.offset_ms)
            await self.feed_async(ev.UserStarted(offset_ms, self.caller_audio.arrival_time(offset_ms)))
        elif response.HasField("speech_stopped") and speaking:
            offset_ms = self.vad_call.session_ms(response.speech_stopped.offset_ms)
            await self.feed_async(ev.UserStopped(offset_ms, self.caller_audio.arrival_time(offset_ms)))

    async def _on_stt(self, response: stt_pb2.RecognizeResponse) -> None:
        if response.HasField("transcript"):
            t = response.transcript
            self.feed(ev.Transcript(t.turn_id, t.text, is_final=t.is_final, at_pause=t.at_pause, stability=t.stability,
                                    confidence=t.confidence, language=t.language))
        elif response.HasField("end_of_utterance"):
            self.feed(ev.EndOfUtterance(response.end_of_utterance.turn_id))

def _recorder(config: pb.SessionConfig, emit, output_format):
    options = config.recording
    if not (options.transcript or options.wav_path or options.stream_audio):
        return None
    from voicemesh.orchestrator.recording import SessionRecorder

    return SessionRecorder(options, emit, user_rate_hz=PIPELINE_RATE_HZ, bot_format=output_format)
