"""One conversation: session-long VAD and STT streams, one BotReply per turn.

Frames flow: caller audio -> (VAD, STT) -> user turn -> BotReply (LLM -> TTS) -> Playout
-> caller. Every task of the session writes events through `emit`, one queue the Converse
handler drains, so the caller sees one ordered stream.
"""
from __future__ import annotations

import asyncio
import sys
import logging
import time
import uuid

import grpc
import numpy as np

from voicemesh.orchestrator.clients import SerialStream, ServiceClients
from voicemesh.orchestrator.forwarding import CallerAudio
from voicemesh.orchestrator.context import ConversationContext
from voicemesh.orchestrator.playout import Playout
from voicemesh.orchestrator.policies import MuteState, SessionTimers
from voicemesh.orchestrator.reply import ReplyEnv
from voicemesh.orchestrator.tools import ToolBroker
from voicemesh.orchestrator.tracing import SessionTracing, metrics
from voicemesh.orchestrator.turns import TurnTaking
from voicemesh.runtime.audio import InboundAudio, OutboundAudio, validate_format
from voicemesh.runtime.errors import FailedPrecondition, InvalidInput
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb, stt_pb2, vad_pb2

log = logging.getLogger("voicemesh.session")
PIPELINE_RATE_HZ = 16000  # the orchestrator feeds VAD and STT PCM16 mono at this rate
END_TIMEOUT_S = 30.0  # a graceful End never waits longer than this
TICK_S = 0.1  # how often the session's timers are checked
DEFAULT_TOOL_TIMEOUT_S = 10.0
DTMF_DIGITS = set("0123456789*#ABCD")
DEFAULT_SYSTEM_PROMPT = "You are a helpful voice assistant. Answer briefly, in plain spoken sentences."


def session_formats(config: pb.SessionConfig) -> tuple[common_pb2.AudioFormat, common_pb2.AudioFormat]:
    """Input and output formats; an entirely unset format takes the default."""
    default_in = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
    default_out = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=24000, channels=1)
    fmt_in = config.input_format if config.HasField("input_format") else default_in
    fmt_out = config.output_format if config.HasField("output_format") else default_out
    validate_format(fmt_in, "Converse: input_format", max_channels=2)
    validate_format(fmt_out, "Converse: output_format")
    return fmt_in, fmt_out


def _smart_turn_and_stop_secs(config: pb.SessionConfig) -> tuple[bool, float]:
    """Smart Turn (unset: on, where the VAD has the model) and the VAD's stop wait (unset:
    0.2 s with Smart Turn, 0.8 s without; a VAD without the model also takes 0.8)."""
    turn = config.turn
    smart_turn = turn.smart_turn if turn.HasField("smart_turn") else True
    return smart_turn, config.vad.stop_secs or (0.2 if smart_turn else 0.8)


def _validate(config: pb.SessionConfig) -> None:
    vad, turn = config.vad, config.turn
    if not (0 <= vad.confidence <= 1 and 0 <= vad.min_volume <= 1 and 0 <= vad.start_secs <= 5 and 0 <= vad.stop_secs <= 10):
        raise InvalidInput("Converse: vad options out of range (confidence, min_volume 0-1; start_secs 0-5; stop_secs 0-10)")
    if not (0 <= turn.smart_turn_threshold <= 1 and 0 <= turn.max_silence_secs <= 30 and 0 <= turn.final_transcript_timeout_secs <= 30
            and 0 <= turn.final_transcript_give_up_secs <= 300):
        raise InvalidInput("Converse: turn options out of range (smart_turn_threshold 0-1; max_silence_secs, "
                           "final_transcript_timeout_secs 0-30; final_transcript_give_up_secs 0-300)")
    if turn.final_transcript_give_up_secs and turn.final_transcript_give_up_secs < turn.final_transcript_timeout_secs:
        raise InvalidInput(f"Converse: turn.final_transcript_give_up_secs ({turn.final_transcript_give_up_secs}) must be at "
                           f"least final_transcript_timeout_secs ({turn.final_transcript_timeout_secs})")
    smart_turn, stop_secs = _smart_turn_and_stop_secs(config)
    if smart_turn and turn.max_silence_secs and turn.max_silence_secs < stop_secs:
        raise InvalidInput(f"Converse: turn.max_silence_secs ({turn.max_silence_secs}) must be at least vad.stop_secs ({stop_secs})")
    lifecycle = config.lifecycle
    if min(lifecycle.idle_timeout_secs, lifecycle.user_idle_secs, lifecycle.max_duration_secs, config.tools.timeout_secs) < 0:
        raise InvalidInput("Converse: timeouts and durations must not be negative")
    names = [tool.name for tool in config.tools.tools]
    if len(set(names)) != len(names):
        raise InvalidInput("Converse: tool names must be unique")
    if any(strategy not in pb.MuteStrategy.values() or strategy == 0 for strategy in config.mute_strategies):
        raise InvalidInput("Converse: unknown mute strategy")


class Session(TurnTaking):
    def __init__(self, config: pb.SessionConfig, clients: ServiceClients, client_metadata=()):
        self.config = pb.SessionConfig()
        self.config.CopyFrom(config)
        self.config.session_id = config.session_id or uuid.uuid4().hex
        self.input_format, self.output_format = session_formats(config)
        _validate(config)
        self.inbound = InboundAudio(self.input_format, PIPELINE_RATE_HZ, "Converse", max_channels=2)
        self.bytes_per_second = OutboundAudio(self.output_format, self.output_format.sample_rate_hz, "Converse").bytes_per_second()
        self.clients = clients
        self.events: asyncio.Queue[pb.ConverseResponse | None] = asyncio.Queue()
        self.playout = Playout(self._send_bot_audio)
        self.playout.on_first_audio = self._bot_started
        self.context = ConversationContext(config.system_prompt or DEFAULT_SYSTEM_PROMPT, config.context.max_messages)
        self.tools = ToolBroker(self.emit, config.tools.timeout_secs or DEFAULT_TOOL_TIMEOUT_S)
        self.mute = MuteState(config.mute_strategies)
        self.tools.on_change = lambda: setattr(self.mute, "tools_in_progress", self.tools.in_progress)
        self.timers = SessionTimers(config.lifecycle)
        self.reply_env = ReplyEnv(clients, self.config, self.output_format, self.bytes_per_second, self.emit, self.tools, self.context)
        self.recorder = _recorder(config, self.emit, self.output_format)
        self.ending = False
        self.awaiting = {}  # turns that ended before their final transcript came, by turn id
        self.tracing = SessionTracing(self.session_id, client_metadata, dict(config.metadata))

    @property
    def session_id(self) -> str:
        return self.config.session_id

    def emit(self, message: pb.ConverseResponse) -> None:
        self.events.put_nowait(message)

    def _send_bot_audio(self, message: pb.ConverseResponse) -> None:
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
        self.vad_call = self.clients.open_vad_stream()
        self.stt_call = SerialStream(self.clients.stt.Recognize())
        # The least stop wait the VAD may use (taking 0.2 s where it turns out 0.8 only makes
        # the urgent frames start early, which costs writes, not latency).
        stop_ms = round(_smart_turn_and_stop_secs(self.config)[1] * 1000)
        self.caller_audio = CallerAudio(self.vad_call, self.stt_call, PIPELINE_RATE_HZ, stop_ms)
        tasks: list[asyncio.Task] = []
        try:
            await self._open_streams()
            self.emit(pb.ConverseResponse(session_started=pb.SessionStarted(session_id=self.session_id, output_format=self.output_format)))
            tasks = [asyncio.create_task(coro) for coro in (
                self._read_caller(request_iterator), self._read_vad(), self._read_stt(), self.playout.run(), self._watch())]
            greeting = self.config.greeting
            if greeting.WhichOneof("greeting"):
                self._bot_says(text=greeting.text, instruction=greeting.generate_instruction or None)
            pending = {*tasks, self._closed}
            while not self._closed.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not self._closed and not task.cancelled() and task.exception() is not None:
                        raise task.exception()
            reason = self._closed.result()
        except grpc.aio.AioRpcError as err:
            source = self._source_of(err)
            log.warning("session %s: %s failed: %s", self.session_id, source, err.details())
            self.tracing.error(err.code().name, source)
            self.emit(pb.ConverseResponse(error=common_pb2.Error(
                code=err.code().name, message=f"{source} service: {err.details()}", fatal=True, source=source)))
            reason = pb.SessionEnded.REASON_ERROR
        finally:
            for task in tasks:
                task.cancel()
            if self.reply_task:
                self.reply_task.cancel()
            if self.turn is not None:
                self._drop_speculation(self.turn)
            self.vad_call.cancel()
            self.stt_call.cancel()
            self._end_open_turns()  # a turn in flight gets its TurnEnded (REASON_SESSION_ENDED)
            self.tools.cancel_all("session ended")
            if self.recorder:
                self.recorder.close()
            failure = sys.exc_info()[0]
            if failure is not None:  # bad input (the caller gets the status) or the call went away
                self.tracing.end("REASON_CANCELLED" if issubclass(failure, asyncio.CancelledError) else "REASON_ERROR")
        self.tracing.end(pb.SessionEnded.Reason.Name(reason))
        self.emit(pb.ConverseResponse(session_ended=pb.SessionEnded(reason=reason)))
        self.events.put_nowait(None)

    async def _open_streams(self) -> None:
        stream_format = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=PIPELINE_RATE_HZ, channels=1)
        vad, turn = self.config.vad, self.config.turn
        # Unset smart_turn and stop_secs stay unset: the VAD service knows whether it has the
        # model and picks stop_secs to match (0.2 s with it, 0.8 s without).
        await self.vad_call.write(vad_pb2.DetectRequest(config=vad_pb2.VadConfig(
            format=stream_format, confidence=vad.confidence, start_secs=vad.start_secs,
            stop_secs=vad.stop_secs, min_volume=vad.min_volume, session_id=self.session_id,
            smart_turn=turn.smart_turn if turn.HasField("smart_turn") else None,
            smart_turn_threshold=turn.smart_turn_threshold, max_silence_secs=turn.max_silence_secs)))
        await self.stt_call.write(stt_pb2.RecognizeRequest(config=stt_pb2.SttConfig(
            format=stream_format, language=self.config.language, interim_results=self.config.interim_transcripts,
            pause_transcripts=True, session_id=self.session_id)))

    def _source_of(self, err: grpc.aio.AioRpcError) -> str:
        for kind, call in (("vad", self.vad_call), ("stt", self.stt_call)):
            if call.done() and not call.cancelled():
                return kind
        return "llm/tts"

    async def _graceful_end(self) -> None:
        """End: let the user's pending turn and the bot's reply finish, then close."""
        deadline = time.monotonic() + END_TIMEOUT_S
        while time.monotonic() < deadline and self.turn is not None and not self.turn.ended:
            await asyncio.sleep(0.05)
        if self.turn is not None and not self.turn.ended:  # it gets REASON_SESSION_ENDED
            log.warning("session %s: End waited %.0f s for turn %d; closing", self.session_id, END_TIMEOUT_S, self.turn.number)
        await self.playout.drained()
        self.close(pb.SessionEnded.REASON_ENDED)

    # ---- caller input ----------------------------------------------------------------
    async def _read_caller(self, request_iterator) -> None:
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "config":
                raise InvalidInput("Converse: config may only be sent once, as the first message")
            if self.ending and kind in ("audio", "text"):
                raise FailedPrecondition(f"Converse: {kind} sent after end; the session is ending, open a new one")
            if kind == "audio":
                received = time.perf_counter()
                await self._forward_audio(self.inbound.convert(request.audio.data))
                metrics().hop.record((time.perf_counter() - received) * 1000, {"direction": "inbound"})
            elif kind == "text":
                if not request.text.text.strip():
                    raise InvalidInput("Converse: text input is empty")
                self.timers.activity()
                self._text_turn(request.text.text)
            elif kind == "dtmf":
                if request.dtmf.digit not in DTMF_DIGITS:
                    raise InvalidInput(f"Converse: dtmf digit {request.dtmf.digit!r} is not one of 0-9, *, #, A-D")
                self.timers.activity()
                self.emit(pb.ConverseResponse(dtmf=pb.DtmfReceived(
                    digit=request.dtmf.digit, turn_number=self.turn.number if self.turn else 0)))
            elif kind == "tool_result":
                self.timers.activity()
                self.tools.resolve(request.tool_result)
            elif kind == "control":
                self.timers.activity()
                if await self._control(request.control) == "cancel":
                    return
        if not self.ending:  # the caller went away without End: that is a cancel
            self.close(pb.SessionEnded.REASON_CANCELLED)

    async def _control(self, control: pb.SessionControl) -> str:
        action = control.WhichOneof("action")
        if action == "cancel":
            self.close(pb.SessionEnded.REASON_CANCELLED)
        elif action == "end" and not self.ending:
            self.ending = True
            await self.caller_audio.flush()
            if self.user_speaking:  # no more audio will come to end the speech
                await self._user_stopped(self.caller_audio.received_ms)
            asyncio.ensure_future(self._graceful_end())
        elif action == "say":
            if not control.say.text.strip():
                raise InvalidInput("Converse: say.text is empty")
            self._bot_says(text=control.say.text)
        elif action == "interrupt":
            self._interrupt()
        elif action == "mute":
            self.mute.client_muted = control.mute.muted
        elif action == "append_context":
            self.context.append(list(control.append_context.messages))
            if control.append_context.run_llm:
                self._bot_says(instruction=None)  # reply to the context as it now stands
        elif action == "replace_context":
            self.context.replace(list(control.replace_context.messages))
        return action or ""

    async def _watch(self) -> None:
        """Session timers: idle timeout, user-idle re-prompts, maximum duration."""
        while True:
            await asyncio.sleep(TICK_S)
            if self.user_speaking or (self.turn is not None and not self.turn.ended):
                self.timers.last_activity = time.monotonic()  # a turn in progress keeps the session alive
            if self.recorder:
                self.recorder.advance()  # silent stretches of a text-only session stream out too
            decision = self.timers.check()
            if decision.reprompt:
                log.info("session %s: the user has been silent %.0f s; re-prompting", self.session_id,
                         self.config.lifecycle.user_idle_secs)
                self._bot_says(text=self.timers.prompt)
            elif decision.end_reason:
                log.info("session %s: ending: %s", self.session_id, pb.SessionEnded.Reason.Name(decision.end_reason))
                if decision.end_reason == pb.SessionEnded.REASON_IDLE_TIMEOUT:
                    self.emit(pb.ConverseResponse(idle_timeout=pb.IdleTimeout(
                        idle_seconds=decision.idle_seconds, user_idle=decision.user_idle)))
                self.close(decision.end_reason)
                return

    async def _forward_audio(self, samples: np.ndarray) -> None:
        if self.recorder:
            self.recorder.user_audio(samples, time.monotonic())
        # Muted: VAD and STT get silence, so stream offsets stay aligned with real time.
        await self.caller_audio.push(np.zeros_like(samples) if self.mute.muted() else samples, self.user_speaking)

    def _arrival_time(self, offset_ms: int) -> float:
        return self.caller_audio.arrival_time(offset_ms)

    # ---- VAD and STT -----------------------------------------------------------------
    async def _read_vad(self) -> None:
        async for response in self.vad_call:
            if response.HasField("speech_started"):
                await self._user_started(response.speech_started.offset_ms)
            elif response.HasField("speech_stopped") and self.user_speaking:
                await self._user_stopped(response.speech_stopped.offset_ms)

    async def _read_stt(self) -> None:
        async for response in self.stt_call:
            if response.HasField("transcript"):
                self._on_transcript(response.transcript)
            elif response.HasField("end_of_utterance"):
                self._on_end_of_utterance(response.end_of_utterance.turn_id)


def _recorder(config: pb.SessionConfig, emit, output_format):
    options = config.recording
    if not (options.transcript or options.wav_path or options.stream_audio):
        return None
    from voicemesh.orchestrator.recording import SessionRecorder

    return SessionRecorder(options, emit, user_rate_hz=PIPELINE_RATE_HZ, bot_format=output_format)
