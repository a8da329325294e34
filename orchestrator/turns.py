"""Turn-taking for a Session: who speaks, when a turn is released, barge-in, bot replies.

A turn starts when the user starts speaking (or types, or the bot speaks first) and ends
when the bot's reply has been played or cut off. Kept apart from session.py, which owns the
streams; this mixin only reacts to their events.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from voicemesh.orchestrator.playout import HeldPlayout
from voicemesh.orchestrator.reply import BotReply, ReplyCalls, Speculation, Turn, call_metadata, same_words
from voicemesh.orchestrator.tracing import metrics
from voicemesh.runtime import telemetry
from voicemesh.v1 import common_pb2, llm_pb2, orchestrator_pb2 as pb, stt_pb2, vad_pb2

log = logging.getLogger("voicemesh.session")
Speaking = pb.SpeakingEvent
DEFAULT_FINAL_TIMEOUT_S = 2.0  # bounded wait for STT's final after the user stops


class TurnTaking:
    """Mixin for Session. Expects: emit, playout, tracing, context, mute, timers, stt_call,
    vad_call, caller_audio, config, reply_env, recorder, _arrival_time."""

    turn: Turn | None = None
    barge: Turn | None = None  # user speech over the bot that has not yet earned an interruption
    turn_count = 0
    reply_task: asyncio.Task | None = None
    user_speaking = False
    pending_finals = 0
    _final_timer: asyncio.TimerHandle | None = None
    _barge_serial = 0

    # ---- turns -----------------------------------------------------------------------
    def _new_turn(self, started_at: float, turn_id: str = "") -> Turn:
        self._interrupt()
        self.pending_finals = 0
        self.turn_count += 1
        turn = Turn(number=self.turn_count, turn_id=turn_id or f"{self.session_id}-{self.turn_count}", started_at=started_at)
        turn.span = self.tracing.start_turn(turn.number, turn.turn_id, started_at)
        self.turn = turn
        self.emit(pb.ConverseResponse(turn_started=pb.TurnStarted(turn_number=turn.number, turn_id=turn.turn_id)))
        return turn

    def _interrupt(self) -> None:
        """Stop the bot: cancel the reply (LLM, TTS, tool calls), drop unplayed audio, end the turn."""
        turn = self.turn
        if turn is None or turn.ended:
            return
        if self.reply_task and not self.reply_task.done():
            self.reply_task.cancel()
        self._drop_speculation(turn)
        self.tools.cancel_all("interrupted")
        self.playout.clear()
        if turn.first_audio_at is not None:
            self.emit(pb.ConverseResponse(clear_playback=pb.ClearPlayback(turn_number=turn.number)))
        self._end_turn(turn, interrupted=turn.replying)

    def _end_turn(self, turn: Turn, interrupted: bool) -> None:
        if turn.ended:
            return
        turn.ended = True
        if turn.calls:
            turn.calls.cancel()
            turn.calls = None
        if turn.replying:
            spoken = " ".join(turn.spoken)
            self.context.add_assistant(spoken, interrupted=interrupted and bool(spoken))
            if spoken and self.recorder:
                self.recorder.entry("assistant", spoken, interrupted=interrupted)
            if turn.first_audio_at is not None:
                self.emit(pb.ConverseResponse(speaking=Speaking(kind=Speaking.KIND_BOT_STOPPED, turn_number=turn.number)))
                self.mute.first_speech_done = True
            self.mute.first_turn_complete = True
            self.timers.bot_finished()
        self.mute.bot_speaking = False
        self.playout.reset_clock()
        duration = time.monotonic() - turn.started_at
        self.tracing.end_turn(turn.span, duration, interrupted, turn.latency_ms)
        self.emit(pb.ConverseResponse(turn_ended=pb.TurnEnded(
            turn_number=turn.number, duration_seconds=duration, interrupted=interrupted, latency_ms=turn.latency_ms)))
        if self.config.metrics:
            input_tokens, output_tokens = turn.llm_usage
            self.emit(pb.ConverseResponse(metrics=pb.Metrics(
                turn_number=turn.number, ttfb_ms=turn.ttfb_ms, voice_to_voice_ms=turn.latency_ms,
                llm_input_tokens=input_tokens, llm_output_tokens=output_tokens,
                tts_characters=turn.tts_characters, processing_ms=duration * 1000)))

    def _bot_started(self, turn_number: int) -> None:
        turn = self.turn
        if turn is not None and turn.number == turn_number and turn.first_audio_at is None:
            turn.first_audio_at = time.monotonic()
            self.mute.bot_speaking = True
            self.timers.bot_started()
            self.emit(pb.ConverseResponse(speaking=Speaking(kind=Speaking.KIND_BOT_STARTED, turn_number=turn_number)))

    def _text_turn(self, text: str) -> None:
        turn = self._new_turn(time.monotonic())
        turn.user_end_at = time.monotonic()
        self.emit(pb.ConverseResponse(user_transcript=pb.UserTranscript(text=text, is_final=True, turn_number=turn.number, confidence=1.0)))
        turn.user_text = text
        self._start_reply(turn)

    def _bot_says(self, text: str = "", instruction: str | None = None) -> None:
        """The bot speaks on its own (greeting, say, re-prompt): fixed text, or an LLM reply to
        the context plus an instruction that is not kept in the context."""
        turn = self._new_turn(time.monotonic())
        turn.replying = True  # a bot-only turn: greeting, say or re-prompt
        reply = BotReply(self.reply_env, self.playout, turn)
        if text:
            work = reply.say(text)
        else:
            extra = [llm_pb2.ChatMessage(role="user", content=instruction)] if instruction else []
            work = reply.run(self.context.snapshot(*extra))
        self.reply_task = asyncio.ensure_future(self._finish_reply(work, turn))

    # ---- releasing the user's turn -----------------------------------------------------
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
            self._end_turn(turn, interrupted=False)  # noise, or nothing recognisable (closes turn.calls)
            return
        turn.replying = True
        self.context.add_user(text)
        if self.recorder:
            self.recorder.entry("user", text)
        if speculation and same_words(speculation.text, text):
            log.debug("turn %s: speculative reply confirmed", turn.turn_id)
            self.reply_task = speculation.task
            if turn.calls:  # the speculation has its own
                turn.calls.cancel()
                turn.calls = None
            speculation.held.release()  # its audio, already synthesised, starts playing now
            return
        if speculation:
            speculation.task.cancel()
        reply = BotReply(self.reply_env, self.playout, turn)
        # turn.calls stays set, so that ending the turn closes them even if the reply never ran.
        self.reply_task = asyncio.ensure_future(self._finish_reply(reply.run(self.context.snapshot(), turn.calls), turn))

    def _speculate(self, turn: Turn, text: str) -> None:
        """The user paused: start the reply now, hold its audio until the turn is confirmed."""
        if turn.speculation and same_words(turn.speculation.text, text):
            return
        self._drop_speculation(turn)
        log.debug("turn %s: speculative reply on %r", turn.turn_id, text)
        held = HeldPlayout(self.playout)
        reply = BotReply(self.reply_env, held, turn, speculative=True)
        messages = self.context.snapshot(llm_pb2.ChatMessage(role="user", content=text))
        turn.speculation = Speculation(text, held, asyncio.ensure_future(self._finish_reply(reply.run(messages), turn, held)))

    def _drop_speculation(self, turn: Turn) -> None:
        if turn.speculation:
            log.debug("turn %s: speculative reply dropped", turn.turn_id)
            turn.speculation.task.cancel()
            turn.speculation = None

    async def _finish_reply(self, work, turn: Turn, held: HeldPlayout | None = None) -> None:
        try:
            await work
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
            self.tracing.error(err.code().name, "llm/tts")
            self.emit(pb.ConverseResponse(error=common_pb2.Error(
                code=err.code().name, message=f"bot reply failed: {err.details()}", fatal=False, source="llm/tts")))
            self._end_turn(turn, interrupted=False)

    # ---- the user speaking -------------------------------------------------------------
    def _bot_replying(self) -> bool:
        return self.turn is not None and self.turn.replying and not self.turn.ended

    async def _user_started(self, offset_ms: int) -> None:
        if self.mute.muted():
            return
        self.timers.activity()
        self.user_speaking = True
        options = self.config.interruptions
        if self._bot_replying():
            if options.HasField("allow") and not options.allow:
                return  # the bot keeps the floor; this speech is ignored
            if options.min_words:
                self._barge_serial += 1  # the bot goes on until this speech has enough words
                self.barge = Turn(number=0, turn_id=f"{self.session_id}-{self.turn_count + 1}.{self._barge_serial}",
                                  started_at=self._arrival_time(offset_ms))
                await self._send_turn_start(self.barge, offset_ms)
                return
        turn = self.turn
        if turn is None or turn.ended or turn.replying:
            turn = self._new_turn(self._arrival_time(offset_ms))  # interrupts a reply in progress (barge-in)
        else:  # the user resumed before the turn was released: same turn, words still coming
            self._drop_speculation(turn)
            if turn.calls:
                turn.calls.cancel()
                turn.calls = None
            if self._final_timer:
                self._final_timer.cancel()
                self._final_timer = None
        self.emit(pb.ConverseResponse(speaking=Speaking(kind=Speaking.KIND_USER_STARTED, turn_number=turn.number, offset_ms=offset_ms)))
        await self._send_turn_start(turn, offset_ms)

    async def _send_turn_start(self, turn: Turn, offset_ms: int) -> None:
        traceparent, tracestate = telemetry.traceparent_of(turn.span) if turn.span else ("", "")
        context = common_pb2.TurnContext(turn_id=turn.turn_id, turn_number=turn.number, audio_offset_ms=offset_ms,
                                         trace=common_pb2.TraceContext(traceparent=traceparent, tracestate=tracestate))
        await self.vad_call.write(vad_pb2.DetectRequest(turn=context))  # its speech segment span joins the turn
        await self.caller_audio.flush_stt()  # the STT hears the turn's pre-roll before its start
        await self.stt_call.write(stt_pb2.RecognizeRequest(turn_start=context))

    def _barge_words(self, text: str) -> None:
        """A transcript of speech over the bot: interrupt once it has min_words words (or at
        once if the bot has finished meanwhile: then it is simply the user's next turn)."""
        barge = self.barge
        words = len(text.split())
        if barge is None or not words or (self._bot_replying() and words < self.config.interruptions.min_words):
            return
        self.barge = None
        turn = self._new_turn(barge.started_at, turn_id=barge.turn_id)  # interrupts the bot
        self.emit(pb.ConverseResponse(speaking=Speaking(kind=Speaking.KIND_USER_STARTED, turn_number=turn.number)))

    async def _user_stopped(self, offset_ms: int) -> None:
        self.user_speaking = False
        if self.barge is not None:  # ask for its final: it may still reach min_words
            await self.caller_audio.flush_stt(offset_ms)
            await self.stt_call.write(stt_pb2.RecognizeRequest(finalize=stt_pb2.Finalize(turn_id=self.barge.turn_id)))
            return
        turn = self.turn
        if turn is None or turn.replying:
            return
        self.timers.activity()
        turn.user_end_at = self._arrival_time(offset_ms)
        self.emit(pb.ConverseResponse(speaking=Speaking(kind=Speaking.KIND_USER_STOPPED, turn_number=turn.number, offset_ms=offset_ms)))
        self.pending_finals += 1
        turn.finalize_sent_at = time.monotonic()
        await self.caller_audio.flush_stt(offset_ms)
        await self.stt_call.write(stt_pb2.RecognizeRequest(finalize=stt_pb2.Finalize(turn_id=turn.turn_id)))
        if turn.calls is None:
            turn.calls = ReplyCalls.open(self.reply_env.clients, call_metadata(turn, speculative=False))
        # Bounded wait for the final transcript: release the turn with what we have.
        if self._final_timer:
            self._final_timer.cancel()
        timeout = self.config.turn.final_transcript_timeout_secs or DEFAULT_FINAL_TIMEOUT_S
        self._final_timer = asyncio.get_running_loop().call_later(timeout, self._start_reply, turn)

    def _on_transcript(self, transcript) -> None:
        """Route one STT transcript to the turn it belongs to."""
        barge = self.barge
        if barge is not None and transcript.turn_id == barge.turn_id:
            self._barge_words(transcript.text)
            if transcript.is_final and self.barge is barge:
                self.barge = None  # too few words: the bot was not interrupted
            elif self.barge is None and transcript.is_final and self.turn is not None:
                self.turn.user_end_at = self.turn.user_end_at or time.monotonic()
                self._accept_final(self.turn, transcript)
                if not self.user_speaking:
                    self._start_reply(self.turn)  # the user already stopped speaking
            return
        turn = self.turn
        if turn is None or transcript.turn_id != turn.turn_id or turn.replying:
            return  # late result for a turn that is already over
        if transcript.at_pause and not transcript.is_final:
            self._speculate(turn, f"{turn.user_text} {transcript.text}".strip())
        if transcript.is_final:
            self._accept_final(turn, transcript)
        elif self.config.interim_transcripts:
            self.emit(pb.ConverseResponse(user_transcript=pb.UserTranscript(
                text=transcript.text, is_final=False, turn_number=turn.number,
                confidence=transcript.stability, language=transcript.language)))

    def _accept_final(self, turn: Turn, transcript) -> None:
        if turn.finalize_sent_at is not None:
            turn.ttfb_ms["stt"] = (time.monotonic() - turn.finalize_sent_at) * 1000
            metrics().ttfb.record(turn.ttfb_ms["stt"], {"service": "stt"})
        turn.user_text = f"{turn.user_text} {transcript.text}".strip()
        self.emit(pb.ConverseResponse(user_transcript=pb.UserTranscript(
            text=transcript.text, is_final=True, turn_number=turn.number,
            confidence=transcript.confidence, language=transcript.language)))

    def _on_end_of_utterance(self, turn_id: str) -> None:
        turn = self.turn
        if turn is None or turn_id != turn.turn_id:
            return
        self.pending_finals = max(0, self.pending_finals - 1)
        # Release the turn once every utterance in it is final and the user is quiet.
        if self.pending_finals == 0 and not self.user_speaking:
            self._start_reply(turn)
