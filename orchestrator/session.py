"""One conversation: session-long VAD and STT streams, one BotReply per turn.

Frames flow: caller audio -> (VAD, STT) -> user turn -> BotReply (LLM -> TTS) -> Playout
-> caller. Every task of the session writes events through `emit`, one queue the Converse
handler drains, so the caller sees one ordered stream.
"""
from __future__ import annotations

import asyncio
import bisect
import sys
import logging
import time
import uuid

import grpc
import numpy as np

from voicemesh.orchestrator.clients import ServiceClients
from voicemesh.orchestrator.playout import HeldPlayout, Playout
from voicemesh.orchestrator.reply import BotReply, Speculation, Turn, same_words
from voicemesh.orchestrator.tracing import SessionTracing, metrics
from voicemesh.runtime import telemetry
from voicemesh.runtime.audio import InboundAudio, OutboundAudio, validate_format
from voicemesh.runtime.errors import FailedPrecondition, InvalidInput
from voicemesh.v1 import common_pb2, llm_pb2, orchestrator_pb2 as pb, stt_pb2, vad_pb2

log = logging.getLogger("voicemesh.session")
PIPELINE_RATE_HZ = 16000  # the orchestrator feeds VAD and STT PCM16 mono at this rate
FORWARD_MS = 60  # audio is batched to this size before it is forwarded (fewer messages)
FINAL_TRANSCRIPT_TIMEOUT_S = 4.0  # bounded wait for STT's final after the user stops
END_TIMEOUT_S = 30.0  # a graceful End never waits longer than this
DEFAULT_SYSTEM_PROMPT = "You are a helpful voice assistant. Answer briefly, in plain spoken sentences."
Speaking = pb.SpeakingEvent


def session_formats(config: pb.SessionConfig) -> tuple[common_pb2.AudioFormat, common_pb2.AudioFormat]:
    """Input and output formats; an entirely unset format takes the default."""
    default_in = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
    default_out = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=24000, channels=1)
    fmt_in = config.input_format if config.HasField("input_format") else default_in
    fmt_out = config.output_format if config.HasField("output_format") else default_out
    validate_format(fmt_in, "Converse: input_format", max_channels=2)
    validate_format(fmt_out, "Converse: output_format")
    return fmt_in, fmt_out


class Session:
    def __init__(self, config: pb.SessionConfig, clients: ServiceClients, client_metadata=()):
        self.config = pb.SessionConfig()
        self.config.CopyFrom(config)
        self.config.session_id = config.session_id or uuid.uuid4().hex
        self.input_format, self.output_format = session_formats(config)
        vad = config.vad
        if not (0 <= vad.confidence <= 1 and 0 <= vad.min_volume <= 1 and 0 <= vad.start_secs <= 5 and 0 <= vad.stop_secs <= 10):
            raise InvalidInput("Converse: vad options out of range (confidence, min_volume 0-1; start_secs 0-5; stop_secs 0-10)")
        self.inbound = InboundAudio(self.input_format, PIPELINE_RATE_HZ, "Converse", max_channels=2)
        self.bytes_per_second = OutboundAudio(self.output_format, self.output_format.sample_rate_hz, "Converse").bytes_per_second()
        self.clients = clients
        self.events: asyncio.Queue[pb.ConverseResponse | None] = asyncio.Queue()
        self.playout = Playout(self.emit)
        self.playout.on_first_audio = self._bot_started
        system = config.system_prompt or DEFAULT_SYSTEM_PROMPT
        self.history = [llm_pb2.ChatMessage(role="system", content=system)]
        self.turn: Turn | None = None
        self.turn_count = 0
        self.reply_task: asyncio.Task | None = None
        self.ending = False
        self._pending = np.zeros(0, dtype=np.int16)
        self._forwarded = 0  # samples sent to VAD/STT so far
        self._arrivals: list[tuple[int, float]] = []  # (end offset in samples, arrival time)
        self._final_timer: asyncio.TimerHandle | None = None
        self.tracing = SessionTracing(self.session_id, client_metadata, dict(config.metadata))
        self.user_speaking = False
        self.pending_finals = 0  # finalize requests whose end of utterance has not come back

    @property
    def session_id(self) -> str:
        return self.config.session_id

    def emit(self, message: pb.ConverseResponse) -> None:
        self.events.put_nowait(message)

    def close(self, reason: int) -> None:
        """Ask the session to stop with `reason` (first caller wins)."""
        if not self._closed.done():
            self._closed.set_result(reason)

    # ---- lifecycle -------------------------------------------------------------------
    async def run(self, request_iterator) -> None:
        """Drive the session until it ends; events go to self.events, then None."""
        self._closed = asyncio.get_running_loop().create_future()
        self.vad_call = self.clients.vad.Detect()
        self.stt_call = self.clients.stt.Recognize()
        tasks: list[asyncio.Task] = []
        try:
            await self._open_streams()
            self.emit(pb.ConverseResponse(session_started=pb.SessionStarted(session_id=self.session_id, output_format=self.output_format)))
            tasks = [asyncio.create_task(coro) for coro in (
                self._read_caller(request_iterator), self._read_vad(), self._read_stt(), self.playout.run())]
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
            if self._final_timer:
                self._final_timer.cancel()
            failure = sys.exc_info()[0]
            if failure is not None:  # bad input (the caller gets the status) or the call went away
                self.tracing.end("REASON_CANCELLED" if issubclass(failure, asyncio.CancelledError) else "REASON_ERROR")
        if self.turn is not None and not self.turn.ended:
            self.tracing.end_turn(self.turn.span, time.monotonic() - self.turn.started_at, self.turn.replying, self.turn.latency_ms)
        self.tracing.end(pb.SessionEnded.Reason.Name(reason))
        self.emit(pb.ConverseResponse(session_ended=pb.SessionEnded(reason=reason)))
        self.events.put_nowait(None)

    async def _open_streams(self) -> None:
        stream_format = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=PIPELINE_RATE_HZ, channels=1)
        vad = self.config.vad
        await self.vad_call.write(vad_pb2.DetectRequest(config=vad_pb2.VadConfig(
            format=stream_format, confidence=vad.confidence, start_secs=vad.start_secs,
            stop_secs=vad.stop_secs, min_volume=vad.min_volume, session_id=self.session_id)))
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
                self._text_turn(request.text.text)
            elif kind == "control":
                action = request.control.WhichOneof("action")
                if action == "cancel":
                    self.close(pb.SessionEnded.REASON_CANCELLED)
                    return
                if action == "end" and not self.ending:
                    self.ending = True
                    await self._flush_audio()
                    if self.user_speaking:  # no more audio will come to end the speech
                        await self._user_stopped(self._forwarded * 1000 // PIPELINE_RATE_HZ)
                    asyncio.ensure_future(self._graceful_end())
        if not self.ending:  # the caller went away without End: that is a cancel
            self.close(pb.SessionEnded.REASON_CANCELLED)

    async def _forward_audio(self, samples: np.ndarray) -> None:
        """Batch caller audio into FORWARD_MS pieces and send each to VAD and STT."""
        self._pending = np.concatenate((self._pending, samples)) if self._pending.size else samples
        if len(self._pending) * 1000 >= FORWARD_MS * PIPELINE_RATE_HZ:
            await self._flush_audio()

    async def _flush_audio(self) -> None:
        if not self._pending.size:
            return
        data = self._pending.astype("<i2", copy=False).tobytes()
        offset_ms = self._forwarded * 1000 // PIPELINE_RATE_HZ
        self._forwarded += len(self._pending)
        self._pending = np.zeros(0, dtype=np.int16)
        self._arrivals.append((self._forwarded, time.monotonic()))
        if len(self._arrivals) > 2000:  # ~2 minutes of history is plenty to time a turn
            del self._arrivals[:1000]
        chunk = common_pb2.AudioChunk(data=data, offset_ms=offset_ms)
        await self.vad_call.write(vad_pb2.DetectRequest(audio=chunk))
        await self.stt_call.write(stt_pb2.RecognizeRequest(audio=chunk))

    def _arrival_time(self, offset_ms: int) -> float:
        """When the audio at stream offset `offset_ms` reached the orchestrator."""
        sample = offset_ms * PIPELINE_RATE_HZ // 1000
        index = bisect.bisect_left(self._arrivals, (sample, 0.0))
        if index >= len(self._arrivals):
            return time.monotonic()
        return self._arrivals[index][1]

    # ---- turns -----------------------------------------------------------------------
    def _new_turn(self, started_at: float) -> Turn:
        self._interrupt()
        self.pending_finals = 0
        self.turn_count += 1
        turn = Turn(number=self.turn_count, turn_id=f"{self.session_id}-{self.turn_count}", started_at=started_at)
        turn.span = self.tracing.start_turn(turn.number, turn.turn_id, started_at)
        self.turn = turn
        self.emit(pb.ConverseResponse(turn_started=pb.TurnStarted(turn_number=turn.number, turn_id=turn.turn_id)))
        return turn

    def _interrupt(self) -> None:
        """The user spoke over the bot: stop the reply, drop unplayed audio, end the turn."""
        turn = self.turn
        if turn is None or turn.ended:
            return
        if self.reply_task and not self.reply_task.done():
            self.reply_task.cancel()
        self._drop_speculation(turn)
        self.playout.clear()
        self._end_turn(turn, interrupted=turn.replying)

    def _end_turn(self, turn: Turn, interrupted: bool) -> None:
        if turn.ended:
            return
        turn.ended = True
        if turn.replying:
            spoken = " ".join(turn.spoken)
            if spoken:
                self.history.append(llm_pb2.ChatMessage(role="assistant", content=spoken))
            if turn.first_audio_at is not None:
                self.emit(pb.ConverseResponse(speaking=Speaking(kind=Speaking.KIND_BOT_STOPPED, turn_number=turn.number)))
        self.playout.reset_clock()
        duration = time.monotonic() - turn.started_at
        self.tracing.end_turn(turn.span, duration, interrupted, turn.latency_ms)
        self.emit(pb.ConverseResponse(turn_ended=pb.TurnEnded(
            turn_number=turn.number, duration_seconds=duration, interrupted=interrupted, latency_ms=turn.latency_ms)))

    def _bot_started(self, turn_number: int) -> None:
        turn = self.turn
        if turn is not None and turn.number == turn_number and turn.first_audio_at is None:
            turn.first_audio_at = time.monotonic()
            self.emit(pb.ConverseResponse(speaking=Speaking(kind=Speaking.KIND_BOT_STARTED, turn_number=turn_number)))

    def _text_turn(self, text: str) -> None:
        turn = self._new_turn(time.monotonic())
        turn.user_end_at = time.monotonic()
        self.emit(pb.ConverseResponse(user_transcript=pb.UserTranscript(text=text, is_final=True, turn_number=turn.number, confidence=1.0)))
        turn.user_text = text
        self._start_reply(turn)

    def _start_reply(self, turn: Turn) -> None:
        """Release the turn to the LLM: confirm the speculative reply if it heard the same words."""
        if self._final_timer:
            self._final_timer.cancel()
            self._final_timer = None
        if turn.ended or turn.replying:
            return
        text = turn.user_text.strip()
        speculation, turn.speculation = turn.speculation, None
        if not text:
            if speculation:
                speculation.task.cancel()
            self._end_turn(turn, interrupted=False)  # noise, or nothing recognisable
            return
        turn.replying = True
        self.history.append(llm_pb2.ChatMessage(role="user", content=text))
        if speculation and same_words(speculation.text, text):
            log.debug("turn %s: speculative reply confirmed", turn.turn_id)
            self.reply_task = speculation.task
            speculation.held.release()  # its audio, already synthesised, starts playing now
            return
        if speculation:
            speculation.task.cancel()
        reply = BotReply(self.clients, self.playout, turn, self.config, self.output_format, self.bytes_per_second, self.emit)
        self.reply_task = asyncio.ensure_future(self._run_reply(reply, turn, list(self.history)))

    def _speculate(self, turn: Turn, text: str) -> None:
        """The user paused: start the reply now, hold its audio until the turn is confirmed."""
        if turn.speculation and same_words(turn.speculation.text, text):
            return
        self._drop_speculation(turn)
        log.debug("turn %s: speculative reply on %r", turn.turn_id, text)
        held = HeldPlayout(self.playout)
        reply = BotReply(self.clients, held, turn, self.config, self.output_format, self.bytes_per_second, self.emit,
                         speculative=True)
        messages = [*self.history, llm_pb2.ChatMessage(role="user", content=text)]
        turn.speculation = Speculation(text, held, asyncio.ensure_future(self._run_reply(reply, turn, messages, held)))

    def _drop_speculation(self, turn: Turn) -> None:
        if turn.speculation:
            log.debug("turn %s: speculative reply dropped", turn.turn_id)
            turn.speculation.task.cancel()
            turn.speculation = None

    async def _run_reply(self, reply: BotReply, turn: Turn, messages: list, held: HeldPlayout | None = None) -> None:
        try:
            await reply.run(messages)
            if held is not None:
                await held.released.wait()
            await self.playout.drained()
            self._end_turn(turn, interrupted=False)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as err:
            if held is not None and not held.released.is_set():
                log.info("session %s: speculative reply failed: %s", self.session_id, err.details())
                if turn.speculation and turn.speculation.held is held:
                    turn.speculation = None  # the turn will start a fresh reply when confirmed
                return
            self.emit(pb.ConverseResponse(error=common_pb2.Error(
                code=err.code().name, message=f"bot reply failed: {err.details()}", fatal=False, source="llm/tts")))
            self._end_turn(turn, interrupted=False)

    # ---- VAD and STT -----------------------------------------------------------------
    async def _read_vad(self) -> None:
        async for response in self.vad_call:
            if response.HasField("speech_started"):
                await self._user_started(response.speech_started.offset_ms)
            elif response.HasField("speech_stopped") and self.user_speaking:
                await self._user_stopped(response.speech_stopped.offset_ms)

    async def _user_started(self, offset_ms: int) -> None:
        self.user_speaking = True
        turn = self.turn
        if turn is None or turn.ended or turn.replying:
            turn = self._new_turn(self._arrival_time(offset_ms))  # interrupts a reply in progress (barge-in)
        else:  # the user resumed before the turn was released: same turn, words still coming
            self._drop_speculation(turn)
            if self._final_timer:
                self._final_timer.cancel()
                self._final_timer = None
        self.emit(pb.ConverseResponse(speaking=Speaking(kind=Speaking.KIND_USER_STARTED, turn_number=turn.number, offset_ms=offset_ms)))
        traceparent, tracestate = telemetry.traceparent_of(turn.span)
        context = common_pb2.TurnContext(turn_id=turn.turn_id, turn_number=turn.number, audio_offset_ms=offset_ms,
                                         trace=common_pb2.TraceContext(traceparent=traceparent, tracestate=tracestate))
        await self.vad_call.write(vad_pb2.DetectRequest(turn=context))  # its speech segment span joins the turn
        await self.stt_call.write(stt_pb2.RecognizeRequest(turn_start=context))

    async def _user_stopped(self, offset_ms: int) -> None:
        self.user_speaking = False
        turn = self.turn
        if turn is None or turn.replying:
            return
        turn.user_end_at = self._arrival_time(offset_ms)
        self.emit(pb.ConverseResponse(speaking=Speaking(kind=Speaking.KIND_USER_STOPPED, turn_number=turn.number, offset_ms=offset_ms)))
        self.pending_finals += 1
        turn.finalize_sent_at = time.monotonic()
        await self.stt_call.write(stt_pb2.RecognizeRequest(finalize=stt_pb2.Finalize(turn_id=turn.turn_id)))
        # Bounded wait for the final transcript: release the turn with what we have.
        if self._final_timer:
            self._final_timer.cancel()
        self._final_timer = asyncio.get_running_loop().call_later(FINAL_TRANSCRIPT_TIMEOUT_S, self._start_reply, turn)

    async def _read_stt(self) -> None:
        async for response in self.stt_call:
            turn = self.turn
            if response.HasField("transcript"):
                transcript = response.transcript
                if turn is None or transcript.turn_id != turn.turn_id or turn.replying:
                    continue  # late result for a turn that is already over
                if transcript.at_pause and not transcript.is_final:
                    self._speculate(turn, f"{turn.user_text} {transcript.text}".strip())
                if transcript.is_final:
                    if turn.finalize_sent_at is not None:
                        metrics().ttfb.record((time.monotonic() - turn.finalize_sent_at) * 1000, {"service": "stt"})
                    turn.user_text = f"{turn.user_text} {transcript.text}".strip()
                    confidence = transcript.confidence
                elif not self.config.interim_transcripts:
                    continue
                else:
                    confidence = transcript.stability
                self.emit(pb.ConverseResponse(user_transcript=pb.UserTranscript(
                    text=transcript.text, is_final=transcript.is_final, turn_number=turn.number,
                    confidence=confidence, language=transcript.language)))
            elif response.HasField("end_of_utterance") and turn is not None and response.end_of_utterance.turn_id == turn.turn_id:
                self.pending_finals = max(0, self.pending_finals - 1)
                # Release the turn once every utterance in it is final and the user is quiet.
                if self.pending_finals == 0 and not self.user_speaking:
                    self._start_reply(turn)
