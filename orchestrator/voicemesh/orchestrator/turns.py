"""Turn-taking for a Session: who speaks, when a turn is released, barge-in, bot replies.

A turn starts when the user starts speaking (or types, or the bot speaks first) and ends
when the bot's reply has been played or cut off. Kept apart from session.py, which owns the
streams; this mixin only reacts to their events.

No turn is lost to timing: once the user stops, the turn waits for the STT's final transcript
however long it takes (a late one is reported with TurnDelayed, and only a final that never
comes is given up, with an Error and REASON_STT_TIMEOUT). Speech after the user's stop is a
new turn, whatever the STT's speed: a turn still waiting for its final is superseded
(REASON_INTERRUPTED), its words join the context when they come, and the next reply answers both.
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
Ended = pb.TurnEnded
DEFAULT_FINAL_LATE_S = 2.0  # a final transcript not in by then is reported late (the turn waits on)
DEFAULT_FINAL_GIVE_UP_S = 30.0  # a final transcript not in by then is given up, with an explicit reason


class TurnTaking:
    """Mixin for Session. Expects: emit, playout, tracing, context, mute, timers, stt_call,
    vad_call, caller_audio, config, reply_env, recorder, _arrival_time, and `awaiting`: a
    dict of the turns that ended before their final transcript came, by turn id."""

    turn: Turn | None = None
    barge: Turn | None = None  # user speech over the bot that has not yet earned an interruption
    turn_count = 0
    reply_task: asyncio.Task | None = None
    user_speaking = False
    unanswered = False  # a superseded turn's words joined the context; no reply has heard them yet
    _barge_serial = 0
    _settled = 0  # superseded turns settled so far: a speculation made before one is stale

    # ---- turns -----------------------------------------------------------------------
    def _new_turn(self, started_at: float, turn_id: str = "") -> Turn:
        self._interrupt()
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
        if turn.pending_finals and not turn.replying:
            self.awaiting[turn.turn_id] = turn  # its final is still coming; its words will join the context
        self._end_turn(turn, Ended.REASON_INTERRUPTED)

    def _end_turn(self, turn: Turn, reason: int) -> None:
        """Every turn ends here, once, with a TurnEnded saying why (see orchestrator.proto)."""
        if turn.ended:
            return
        turn.ended = True
        interrupted = reason == Ended.REASON_INTERRUPTED or (reason == Ended.REASON_SESSION_ENDED and turn.replying)
        turn.cancel_timers()
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
        turn.ended_as = (duration, interrupted, Ended.Reason.Name(reason))
        if turn.turn_id not in self.awaiting:  # else its span ends with its final, which it encloses
            self.tracing.end_turn(turn.span, *turn.ended_as[:2], turn.latency_ms, turn.ended_as[2])
        if reason != Ended.REASON_ANSWERED:
            log.info("session %s: turn %d ended: %s", self.session_id, turn.number, turn.ended_as[2])
        self.emit(pb.ConverseResponse(turn_ended=pb.TurnEnded(
            turn_number=turn.number, duration_seconds=duration, interrupted=interrupted, latency_ms=turn.latency_ms,
            reason=reason)))
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
        """Release the turn to the LLM (every final is in): confirm the speculative reply if it
        heard the same words."""
        if turn.ended or turn.replying:
            return
        turn.cancel_timers()
        text = turn.user_text.strip()
        speculation, turn.speculation = turn.speculation, None
        if not text and not self.unanswered:
            if speculation:
                speculation.task.cancel()
            self._end_turn(turn, Ended.REASON_NO_SPEECH)  # noise, or nothing recognisable (closes turn.calls)
            return
        # With no words of its own (a cough after a question the STT was still working on), the
        # turn answers the superseded turn's words, as it would have been answered on a fast STT.
        turn.replying = True
        self.unanswered = False
        if text:
            self.context.add_user(text)
            if self.recorder:
                self.recorder.entry("user", text)
        if speculation and text and speculation.settled == self._settled and same_words(speculation.text, text):
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
        task = asyncio.ensure_future(self._finish_reply(reply.run(messages), turn, held))
        turn.speculation = Speculation(text, held, task, settled=self._settled)

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
            self._end_turn(turn, Ended.REASON_ANSWERED)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # any failure ends this turn with a reason, never silently
            if isinstance(err, grpc.aio.AioRpcError):
                code, details = err.code().name, err.details()
            else:
                log.exception("session %s: bot reply failed", self.session_id)
                code, details = "INTERNAL", f"{type(err).__name__}: {err}"
            if held is not None and not held.released.is_set():
                log.info("session %s: speculative reply failed: %s", self.session_id, details)
                if turn.speculation and turn.speculation.held is held:
                    turn.speculation = None  # the turn will start a fresh reply when confirmed
                return
            self.tracing.error(code, "llm/tts")
            self.emit(pb.ConverseResponse(error=common_pb2.Error(
                code=code, message=f"bot reply failed: {details}", fatal=False, source="llm/tts")))
            self._end_turn(turn, Ended.REASON_REPLY_FAILED)

    # ---- the user speaking -------------------------------------------------------------
    def _bot_replying(self) -> bool:
        return self.turn is not None and self.turn.replying and not self.turn.ended

    async def _user_started(self, offset_ms: int) -> None:
        if self.mute.muted():
            return
        self.timers.activity()
        self.user_speaking = True
        options = self.config.interruptions
        if self.barge is not None and not self._bot_replying():
            self._barge_to_turn()  # the bot finished while that speech's final was on its way
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
        if turn is None or turn.ended or turn.replying or turn.user_end_at is not None:
            # A new turn. It interrupts a reply in progress (barge-in), or supersedes a turn still
            # waiting for its final: speech after the user's stop is a new turn however fast the
            # STT is, so the outcome never depends on the machine's speed.
            turn = self._new_turn(self._arrival_time(offset_ms))
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
        self._barge_to_turn()  # interrupts the bot

    def _barge_to_turn(self) -> Turn:
        """Speech over the bot becomes the user's turn, with its Finalize (if sent) still owed."""
        barge, self.barge = self.barge, None
        turn = self._new_turn(barge.started_at, turn_id=barge.turn_id)
        turn.pending_finals, turn.user_end_at, turn.finalize_sent_at = barge.pending_finals, barge.user_end_at, barge.finalize_sent_at
        self.emit(pb.ConverseResponse(speaking=Speaking(kind=Speaking.KIND_USER_STARTED, turn_number=turn.number)))
        return turn

    async def _user_stopped(self, offset_ms: int) -> None:
        self.user_speaking = False
        barge = self.barge
        if barge is not None:  # ask for its final: it may still reach min_words
            barge.pending_finals += 1
            barge.user_end_at, barge.finalize_sent_at = self._arrival_time(offset_ms), time.monotonic()
            await self.caller_audio.flush_stt(offset_ms)
            await self.stt_call.write(stt_pb2.RecognizeRequest(finalize=stt_pb2.Finalize(turn_id=barge.turn_id)))
            return
        turn = self.turn
        if turn is None or turn.replying or turn.ended:
            return
        self.timers.activity()
        turn.user_end_at = self._arrival_time(offset_ms)
        self.emit(pb.ConverseResponse(speaking=Speaking(kind=Speaking.KIND_USER_STOPPED, turn_number=turn.number, offset_ms=offset_ms)))
        turn.pending_finals += 1
        turn.finalize_sent_at = time.monotonic()
        await self.caller_audio.flush_stt(offset_ms)
        await self.stt_call.write(stt_pb2.RecognizeRequest(finalize=stt_pb2.Finalize(turn_id=turn.turn_id)))
        if turn.ended or turn.replying:  # it changed while the writes waited
            return
        if turn.calls is None:
            turn.calls = ReplyCalls.open(self.reply_env.clients, call_metadata(turn, speculative=False))
        self._watch_final(turn)

    # ---- waiting for the final transcript ----------------------------------------------
    def _watch_final(self, turn: Turn) -> None:
        """The turn waits for its final; these timers only report a late one, or give up on one
        that never comes. Neither releases the turn with a partial transcript."""
        turn.cancel_timers()
        options = self.config.turn
        late = options.final_transcript_timeout_secs or DEFAULT_FINAL_LATE_S
        give_up = options.final_transcript_give_up_secs or max(DEFAULT_FINAL_GIVE_UP_S, late)
        loop = asyncio.get_running_loop()
        turn.timers = [loop.call_later(late, self._final_late, turn, late),
                       loop.call_later(give_up, self._final_given_up, turn, give_up)]

    def _final_late(self, turn: Turn, waited: float) -> None:
        if turn.ended or turn.replying or not turn.pending_finals or turn.delayed:
            return
        turn.delayed = True
        log.warning("session %s: turn %d: no final transcript %.1f s after the user stopped; still waiting",
                    self.session_id, turn.number, waited)
        metrics().delayed.add(1, {"waiting_for": "stt"})
        self.emit(pb.ConverseResponse(turn_delayed=pb.TurnDelayed(
            turn_number=turn.number, waiting_for="stt", waited_seconds=waited)))

    def _final_given_up(self, turn: Turn, waited: float) -> None:
        if turn.ended or turn.replying:
            return
        message = (f"no final transcript from the STT service {waited:.1f} s after the user stopped; turn "
                   f"{turn.number} is given up (TurnOptions.final_transcript_give_up_secs)")
        log.warning("session %s: %s", self.session_id, message)
        self.tracing.error("DEADLINE_EXCEEDED", "stt")
        self.emit(pb.ConverseResponse(error=common_pb2.Error(
            code="DEADLINE_EXCEEDED", message=message, fatal=False, source="stt")))
        self._drop_speculation(turn)
        self._end_turn(turn, Ended.REASON_STT_TIMEOUT)

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
        superseded = self.awaiting.get(transcript.turn_id)
        if superseded is not None:
            if transcript.is_final:
                self._accept_final(superseded, transcript)
            return
        turn = self.turn
        if turn is None or transcript.turn_id != turn.turn_id or turn.replying or turn.ended:
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
        superseded = self.awaiting.get(turn_id)
        if superseded is not None:
            superseded.pending_finals = max(0, superseded.pending_finals - 1)
            if not superseded.pending_finals:
                self._settle(superseded)
            return
        turn = self.turn
        if turn is None or turn_id != turn.turn_id:
            return
        turn.pending_finals = max(0, turn.pending_finals - 1)
        # Release the turn once every utterance in it is final and the user is quiet.
        if turn.pending_finals == 0 and not self.user_speaking:
            self._start_reply(turn)

    def _settle(self, turn: Turn) -> None:
        """A superseded turn's final is in: its words join the context, ahead of the next turn's
        (finals come in the order of the Finalize messages), and its span ends."""
        del self.awaiting[turn.turn_id]
        self._settled += 1
        text = turn.user_text.strip()
        if text:
            self.context.add_user(text)
            self.unanswered = True
            if self.recorder:
                self.recorder.entry("user", text)
        self.tracing.end_turn(turn.span, *turn.ended_as[:2], turn.latency_ms, turn.ended_as[2])

    def _end_open_turns(self) -> None:
        """The session is over: the turn in flight ends with REASON_SESSION_ENDED; superseded
        turns whose final never came keep the reason they ended with."""
        if self.turn is not None and not self.turn.ended:
            self._drop_speculation(self.turn)
            self._end_turn(self.turn, Ended.REASON_SESSION_ENDED)
        for turn in list(self.awaiting.values()):
            del self.awaiting[turn.turn_id]
            self.tracing.end_turn(turn.span, *turn.ended_as[:2], turn.latency_ms, turn.ended_as[2])
