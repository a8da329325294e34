"""The turn controller: who speaks, when a turn is released, barge-in, speculation, mute.

It has no I/O. The session feeds it events (turn_events.py) with the time they happened and
carries out the effects it returns, in order. It never reads a clock, opens a stream or starts
a task, so every rule below is tested in-process (tests/orchestrator/).

The session's own rules around its turns (idle timeout, re-prompts, End, Cancel) are in
lifecycle.py, which hands every other event to this controller.

A turn starts when the user starts speaking (or types, or the bot speaks first) and ends when
the bot's reply has been played or cut off, once, with a TurnEnded saying why.

No turn is lost to timing: once the user stops, the turn waits for the STT's final transcript
however long it takes (a late one is reported with TurnDelayed, and only a final that never
comes is given up, with an Error and REASON_STT_TIMEOUT). Speech after the user's stop is a
new turn, whatever the STT's speed: a turn still waiting for its final is superseded
(REASON_INTERRUPTED), its words join the context when they come, and the next reply answers both.
"""
from __future__ import annotations

from voicemesh.orchestrator import turn_events as ev
from voicemesh.orchestrator.policies import MuteState, TurnLifecycle
from voicemesh.orchestrator.turn_events import Speculation, Turn
from voicemesh.v1 import orchestrator_pb2 as pb

Speaking = pb.SpeakingEvent
Ended = pb.TurnEnded
DEFAULT_FINAL_LATE_S = 2.0  # a final transcript not in by then is reported late (the turn waits on)
DEFAULT_FINAL_GIVE_UP_S = 30.0  # a final transcript not in by then is given up, with an explicit reason
FINAL_LATE, FINAL_GIVE_UP = "final_late", "final_give_up"  # timer names
LISTENING, USER_SPEAKING, AWAITING_FINAL, REPLYING = "LISTENING", "USER_SPEAKING", "AWAITING_FINAL", "REPLYING"


def same_words(a: str, b: str) -> bool:
    """Transcripts equal up to case and punctuation."""
    def words(text: str) -> list[str]:
        return [w.strip(".,!?;:\"'").lower() for w in text.split()]

    return words(a) == words(b)


class TurnController:
    """One session's turn-taking. Its state (`state`) is where the current turn stands:

    - LISTENING: no turn in flight (none yet, or the last one ended);
    - USER_SPEAKING: the user's turn is open and the VAD hears speech;
    - AWAITING_FINAL: the user stopped; the turn waits for its final transcripts (pending_finals);
    - REPLYING: the bot has the floor (a reply, greeting, say or re-prompt runs or plays);
      user speech over it is a barge-in, or, with min_words, `barge` until it has enough words.

    Beside it: turns superseded before their final came (`awaiting`), and the policies that
    follow the turns (`policies`: mute here, the idle timers of lifecycle.py).
    """

    def __init__(self, config: pb.SessionConfig, now: float, policies: tuple[TurnLifecycle, ...] = ()):
        self.config = config
        self.session_id = config.session_id
        self.mute = MuteState(config.mute_strategies)
        self.policies: tuple[TurnLifecycle, ...] = (self.mute, *policies)
        self.turn: Turn | None = None
        self.barge: Turn | None = None  # user speech over the bot that has not yet earned an interruption
        self.turn_count = 0
        self.user_speaking = False
        self.unanswered = False  # a superseded turn's words joined the context; no reply has heard them yet
        self.awaiting: dict[str, Turn] = {}  # turns that ended before their final transcript came, by turn id
        self._barge_serial = 0
        self._settled = 0  # superseded turns settled so far: a speculation made before one is stale
        self.now = now
        self._out: list = []

    def handle(self, event, now: float) -> list:
        """Apply one event at time `now`; returns the effects to carry out, in order."""
        self.now = now
        self._out = []
        getattr(self, "_on_" + type(event).__name__)(event)
        return self._out

    @property
    def state(self) -> str:
        turn = self.turn
        if turn is None or turn.ended:
            return LISTENING
        if turn.replying:
            return REPLYING
        return USER_SPEAKING if self.user_speaking else AWAITING_FINAL

    def muted(self) -> bool:
        return self.mute.muted()

    def in_flight(self) -> bool:
        return self.turn is not None and not self.turn.ended

    def end_waits(self) -> bool:
        """What End lets finish: a turn in flight, or speech over the bot (min_words) that may
        still become one once its final comes (End's own cap bounds the wait)."""
        return self.in_flight() or self.barge is not None

    def _do(self, *effects) -> None:
        self._out.extend(effects)

    def _emit(self, event: str, **fields) -> None:
        self._out.append(ev.Emit(event, fields))

    def _log(self, level: str, message: str) -> None:
        self._out.append(ev.Log(level, f"session {self.session_id}: {message}"))

    # ---- turns -----------------------------------------------------------------------
    def _new_turn(self, started_at: float, turn_id: str = "") -> Turn:
        self._interrupt()
        self.turn_count += 1
        turn = Turn(number=self.turn_count, turn_id=turn_id or f"{self.session_id}-{self.turn_count}", started_at=started_at)
        self._do(ev.TurnOpened(turn))
        self.turn = turn
        self._emit("turn_started", turn_number=turn.number, turn_id=turn.turn_id)
        return turn

    def _interrupt(self) -> None:
        """Stop the bot: cancel the reply (LLM, TTS, tool calls), drop unplayed audio, end the turn."""
        turn = self.turn
        if turn is None or turn.ended:
            return
        self._do(ev.CancelReply())
        self._drop_speculation(turn)
        self._do(ev.CancelTools("interrupted"), ev.ClearPlayout(turn.number))
        if turn.first_audio_at is not None:
            self._emit("clear_playback", turn_number=turn.number)
        if turn.pending_finals and not turn.replying:
            self.awaiting[turn.turn_id] = turn  # its final is still coming; its words will join the context
        self._end_turn(turn, Ended.REASON_INTERRUPTED)

    def _end_turn(self, turn: Turn, reason: int) -> None:
        """Every turn ends here, once, with a TurnEnded saying why (see orchestrator.proto)."""
        if turn.ended:
            return
        turn.ended = True
        interrupted = reason == Ended.REASON_INTERRUPTED or (reason == Ended.REASON_SESSION_ENDED and turn.replying)
        self._cancel_timers(turn)
        self._do(ev.CloseReplyCalls(turn))
        if turn.replying:
            spoken = " ".join(turn.spoken)
            if spoken:  # only what was heard, marked if it was cut off
                self._do(ev.AddToContext("assistant", spoken, interrupted=interrupted))
            if turn.first_audio_at is not None:
                self._emit("speaking", kind=Speaking.KIND_BOT_STOPPED, turn_number=turn.number)
        for policy in self.policies:
            policy.turn_ended(turn.replying, turn.first_audio_at is not None, self.now)
        self._do(ev.ResetPlayoutClock())
        duration = self.now - turn.started_at
        turn.ended_as = (duration, interrupted, Ended.Reason.Name(reason))
        if turn.turn_id not in self.awaiting:  # else its span ends with its final, which it encloses
            self._do(ev.TurnFinished(turn))
        if reason != Ended.REASON_ANSWERED:
            self._log("info", f"turn {turn.number} ended: {turn.ended_as[2]}")
        self._emit("turn_ended", turn_number=turn.number, duration_seconds=duration, interrupted=interrupted,
                   latency_ms=turn.latency_ms, reason=reason)
        if self.config.metrics:
            input_tokens, output_tokens = turn.llm_usage
            self._emit("metrics", turn_number=turn.number, ttfb_ms=dict(turn.ttfb_ms), voice_to_voice_ms=turn.latency_ms,
                       llm_input_tokens=input_tokens, llm_output_tokens=output_tokens,
                       tts_characters=turn.tts_characters, processing_ms=duration * 1000)

    def _cancel_timers(self, turn: Turn) -> None:
        for name in sorted(turn.timers):
            self._do(ev.CancelTimer(name, turn))
        turn.timers.clear()

    def _start_timer(self, name: str, turn: Turn, seconds: float) -> None:
        turn.timers.add(name)
        self._do(ev.StartTimer(name, turn, self.now + seconds))

    def _user_active(self) -> None:
        for policy in self.policies:
            policy.user_active(self.now)

    def _bot_replying(self) -> bool:
        return self.turn is not None and self.turn.replying and not self.turn.ended

    # ---- the bot -----------------------------------------------------------------------
    def _on_ReplyFirstAudio(self, event: ev.ReplyFirstAudio) -> None:
        turn = self.turn
        if turn is not None and turn.number == event.turn_number and turn.first_audio_at is None:
            turn.first_audio_at = self.now
            for policy in self.policies:
                policy.bot_started(self.now)
            self._emit("speaking", kind=Speaking.KIND_BOT_STARTED, turn_number=event.turn_number)

    def _on_ReplyDone(self, event: ev.ReplyDone) -> None:
        self._end_turn(event.turn, Ended.REASON_ANSWERED)

    def _on_ReplyFailed(self, event: ev.ReplyFailed) -> None:
        # Any failure ends this turn with a reason, never silently.
        self._do(ev.EmitError(event.code, f"bot reply failed: {event.details}", "llm/tts"))
        self._end_turn(event.turn, Ended.REASON_REPLY_FAILED)

    def _on_SpeculationFailed(self, event: ev.SpeculationFailed) -> None:
        if event.turn.speculation is event.speculation:
            event.turn.speculation = None  # the turn will start a fresh reply when confirmed

    def _on_Say(self, event: ev.Say) -> None:
        turn = self._new_turn(self.now)
        turn.replying = True  # a bot-only turn: greeting, say or re-prompt
        self._do(ev.StartBotReply(turn, event.text, event.instruction))

    def _on_ToolsChanged(self, event: ev.ToolsChanged) -> None:
        self.mute.tools_in_progress = event.in_progress

    # ---- the client ----------------------------------------------------------------------
    def _on_TypedText(self, event: ev.TypedText) -> None:
        self._user_active()
        turn = self._new_turn(self.now)
        turn.user_end_at = self.now
        self._emit("user_transcript", text=event.text, is_final=True, turn_number=turn.number, confidence=1.0)
        turn.user_text = event.text
        self._start_reply(turn)

    def _on_Interrupt(self, event: ev.Interrupt) -> None:
        self._interrupt()

    def _on_Mute(self, event: ev.Mute) -> None:
        self.mute.client_muted = event.muted

    def _on_SessionClosing(self, event: ev.SessionClosing) -> None:
        """The turn in flight ends with REASON_SESSION_ENDED; superseded turns whose final never
        came keep the reason they ended with."""
        if self.turn is not None:
            self._drop_speculation(self.turn)
        if self.in_flight():
            self._end_turn(self.turn, Ended.REASON_SESSION_ENDED)
        for turn in list(self.awaiting.values()):
            del self.awaiting[turn.turn_id]
            self._do(ev.TurnFinished(turn))

    # ---- timers ------------------------------------------------------------------------
    def _on_TimerExpired(self, event: ev.TimerExpired) -> None:
        turn = event.turn
        if event.name not in turn.timers:
            return  # cancelled meanwhile
        turn.timers.discard(event.name)
        if event.name == FINAL_LATE:
            self._final_late(turn)
        elif event.name == FINAL_GIVE_UP:
            self._final_given_up(turn)

    def _final_timeouts(self) -> tuple[float, float]:
        options = self.config.turn
        late = options.final_transcript_timeout_secs or DEFAULT_FINAL_LATE_S
        return late, options.final_transcript_give_up_secs or max(DEFAULT_FINAL_GIVE_UP_S, late)

    def _watch_final(self, turn: Turn) -> None:
        """The turn waits for its final; these timers only report a late one, or give up on one
        that never comes. Neither releases the turn with a partial transcript."""
        self._cancel_timers(turn)
        late, give_up = self._final_timeouts()
        self._start_timer(FINAL_LATE, turn, late)
        self._start_timer(FINAL_GIVE_UP, turn, give_up)

    def _final_late(self, turn: Turn) -> None:
        if turn.ended or turn.replying or not turn.pending_finals or turn.delayed:
            return
        turn.delayed = True
        waited = self._final_timeouts()[0]
        self._log("warning", f"turn {turn.number}: no final transcript {waited:.1f} s after the user stopped; still waiting")
        self._do(ev.CountDelayed("stt"))
        self._emit("turn_delayed", turn_number=turn.number, waiting_for="stt", waited_seconds=waited)

    def _final_given_up(self, turn: Turn) -> None:
        if turn.ended or turn.replying:
            return
        waited = self._final_timeouts()[1]
        message = (f"no final transcript from the STT service {waited:.1f} s after the user stopped; turn "
                   f"{turn.number} is given up (TurnOptions.final_transcript_give_up_secs)")
        self._log("warning", message)
        self._do(ev.EmitError("DEADLINE_EXCEEDED", message, "stt"))
        self._drop_speculation(turn)
        self._end_turn(turn, Ended.REASON_STT_TIMEOUT)

    # ---- releasing the user's turn -----------------------------------------------------
    def _start_reply(self, turn: Turn) -> None:
        """Release the turn to the LLM (every final is in): confirm the speculative reply if it
        heard the same words."""
        if turn.ended or turn.replying:
            return
        self._cancel_timers(turn)
        text = turn.user_text.strip()
        speculation, turn.speculation = turn.speculation, None
        if not text and not self.unanswered:
            if speculation:
                self._do(ev.DropSpeculation(speculation))
            self._end_turn(turn, Ended.REASON_NO_SPEECH)  # noise, or nothing recognisable (closes its calls)
            return
        # With no words of its own (a cough after a question the STT was still working on), the
        # turn answers the superseded turn's words, as it would have been answered on a fast STT.
        turn.replying = True
        self.unanswered = False
        if text:
            self._do(ev.AddToContext("user", text))
        if speculation and text and speculation.settled == self._settled and same_words(speculation.text, text):
            self._log("debug", f"turn {turn.turn_id}: speculative reply confirmed")
            self._do(ev.ConfirmSpeculation(turn, speculation))  # its audio, already synthesised, plays now
            return
        if speculation:
            self._do(ev.DropSpeculation(speculation))
        self._do(ev.StartReply(turn))  # the turn's calls stay open until it ends, even if the reply never ran

    def _speculate(self, turn: Turn, text: str) -> None:
        """The user paused: start the reply now, hold its audio until the turn is confirmed."""
        if turn.speculation and same_words(turn.speculation.text, text):
            return
        self._drop_speculation(turn)
        self._log("debug", f"turn {turn.turn_id}: speculative reply on {text!r}")
        turn.speculation = Speculation(text, settled=self._settled)
        self._do(ev.Speculate(turn, turn.speculation))

    def _drop_speculation(self, turn: Turn) -> None:
        if turn.speculation:
            self._log("debug", f"turn {turn.turn_id}: speculative reply dropped")
            self._do(ev.DropSpeculation(turn.speculation))
            turn.speculation = None

    # ---- the user speaking -------------------------------------------------------------
    def _on_UserStarted(self, event: ev.UserStarted) -> None:
        if self.mute.muted():
            return
        self._user_active()
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
                                  started_at=event.arrival)
                self._do(ev.SendTurnStart(self.barge, event.offset_ms))
                return
        turn = self.turn
        if turn is None or turn.ended or turn.replying or turn.user_end_at is not None:
            # A new turn. It interrupts a reply in progress (barge-in), or supersedes a turn still
            # waiting for its final: speech after the user's stop is a new turn however fast the
            # STT is, so the outcome never depends on the machine's speed.
            turn = self._new_turn(event.arrival)
        self._emit("speaking", kind=Speaking.KIND_USER_STARTED, turn_number=turn.number, offset_ms=event.offset_ms)
        self._do(ev.SendTurnStart(turn, event.offset_ms))

    def _barge_words(self, text: str) -> None:
        """A transcript of speech over the bot: interrupt once it has min_words words (or at
        once if the bot has finished meanwhile: then it is simply the user's next turn)."""
        words = len(text.split())
        if self.barge is None or not words or (self._bot_replying() and words < self.config.interruptions.min_words):
            return
        self._barge_to_turn()  # interrupts the bot

    def _barge_to_turn(self) -> Turn:
        """Speech over the bot becomes the user's turn, with its Finalize (if sent) still owed."""
        barge, self.barge = self.barge, None
        turn = self._new_turn(barge.started_at, turn_id=barge.turn_id)
        turn.pending_finals, turn.user_end_at = barge.pending_finals, barge.user_end_at
        turn.finalize_sent_at = barge.finalize_sent_at
        self._emit("speaking", kind=Speaking.KIND_USER_STARTED, turn_number=turn.number)
        return turn

    def _on_UserStopped(self, event: ev.UserStopped) -> None:
        if not self.user_speaking:
            return
        self.user_speaking = False
        barge = self.barge
        if barge is not None:  # ask for its final: it may still reach min_words
            barge.pending_finals += 1
            barge.user_end_at, barge.finalize_sent_at = event.arrival, self.now
            self._do(ev.SendFinalize(barge, event.offset_ms, resume=False))
            return
        turn = self.turn
        if turn is None or turn.replying or turn.ended:
            return
        self._user_active()
        turn.user_end_at = event.arrival
        self._emit("speaking", kind=Speaking.KIND_USER_STOPPED, turn_number=turn.number, offset_ms=event.offset_ms)
        turn.pending_finals += 1
        turn.finalize_sent_at = self.now
        self._do(ev.SendFinalize(turn, event.offset_ms, resume=True))

    def _on_FinalizeSent(self, event: ev.FinalizeSent) -> None:
        turn = event.turn
        if turn.ended or turn.replying:  # it changed while the writes waited
            return
        self._do(ev.OpenReplyCalls(turn))  # call setup off the critical path (the session opens them once)
        self._watch_final(turn)

    # ---- transcripts -------------------------------------------------------------------
    def _on_Transcript(self, transcript: ev.Transcript) -> None:
        """Route one STT transcript to the turn it belongs to."""
        barge = self.barge
        if barge is not None and transcript.turn_id == barge.turn_id:
            self._barge_words(transcript.text)
            if transcript.is_final and self.barge is barge:
                self.barge = None  # too few words: the bot was not interrupted
            elif self.barge is None and transcript.is_final and self.turn is not None:
                self.turn.user_end_at = self.turn.user_end_at or self.now
                self._accept_final(self.turn, transcript)
                _final_in(self.turn)
                if not self.user_speaking:
                    self._start_reply(self.turn)  # the user already stopped speaking
            return
        superseded = self.awaiting.get(transcript.turn_id)
        if superseded is not None:
            if transcript.is_final:
                self._accept_final(superseded, transcript)
                if _final_in(superseded):
                    self._settle(superseded)
            return
        turn = self.turn
        if turn is None or transcript.turn_id != turn.turn_id or turn.replying or turn.ended:
            return  # late result for a turn that is already over
        if transcript.at_pause and not transcript.is_final:
            self._speculate(turn, f"{turn.user_text} {transcript.text}".strip())
        if transcript.is_final:
            self._accept_final(turn, transcript)
            # Release the turn once every utterance in it is final and the user is quiet.
            if _final_in(turn) and not self.user_speaking:
                self._start_reply(turn)
        elif self.config.interim_transcripts:
            self._emit("user_transcript", text=transcript.text, is_final=False, turn_number=turn.number,
                       confidence=transcript.stability, language=transcript.language)

    def _accept_final(self, turn: Turn, transcript: ev.Transcript) -> None:
        if turn.finalize_sent_at is not None:
            turn.ttfb_ms["stt"] = (self.now - turn.finalize_sent_at) * 1000
            self._do(ev.RecordTtfb("stt", turn.ttfb_ms["stt"]))
        turn.user_text = f"{turn.user_text} {transcript.text}".strip()
        self._emit("user_transcript", text=transcript.text, is_final=True, turn_number=turn.number,
                   confidence=transcript.confidence, language=transcript.language)

    def _on_EndOfUtterance(self, event: ev.EndOfUtterance) -> None:
        """Nothing to do: the final before it (one per Finalize, contract.md) already counted.
        Releasing the turn on the final, not on this message, takes one STT message off the
        critical path."""

    def _settle(self, turn: Turn) -> None:
        """A superseded turn's final is in: its words join the context, ahead of the next turn's
        (finals come in the order of the Finalize messages), and its span ends."""
        del self.awaiting[turn.turn_id]
        self._settled += 1
        text = turn.user_text.strip()
        if text:
            self._do(ev.AddToContext("user", text))
            self.unanswered = True
        self._do(ev.TurnFinished(turn))


def _final_in(turn: Turn) -> bool:
    """One of the turn's Finalize messages is answered; True when none is still owed."""
    turn.pending_finals = max(0, turn.pending_finals - 1)
    return turn.pending_finals == 0
