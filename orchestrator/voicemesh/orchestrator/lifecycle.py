"""The session's own rules around its turns, with no I/O: idle timeout, user-idle re-prompts,
maximum duration, End (the turn in flight finishes first) and Cancel.

`SessionLifecycle` is what the Session feeds: it handles these events itself and hands every
other one to the TurnController (turns.py), whose turns it follows through the idle timers
(a policy of the controller). Like the controller, it is given the time and returns effects.
"""
from __future__ import annotations

from voicemesh.orchestrator import turn_events as ev
from voicemesh.orchestrator.policies import SessionTimers
from voicemesh.orchestrator.turns import TurnController
from voicemesh.v1 import orchestrator_pb2 as pb

END_TIMEOUT_S = 30.0  # a graceful End never waits longer than this for the turn in flight
END_WAIT = "end_wait"  # its timer


class SessionLifecycle:
    def __init__(self, config: pb.SessionConfig, now: float):
        self.session_id = config.session_id
        self.user_idle_secs = config.lifecycle.user_idle_secs
        self.timers = SessionTimers(config.lifecycle, now)
        self.turns = TurnController(config, now, policies=(self.timers,))
        self.ending = False  # End received
        self._closing = False  # Close or CloseWhenDrained already asked for
        self.now = now
        self._own = {ev.Tick: self._tick, ev.End: self._end, ev.Cancel: self._cancel, ev.Dtmf: self._dtmf,
                     ev.ClientActivity: self._activity, ev.SessionClosing: self._session_closing}

    def handle(self, event, now: float) -> list:
        """Apply one event at time `now`; returns the effects to carry out, in order."""
        self.now = now
        own = self._own.get(type(event))
        if own is not None:
            out = own(event)
        elif isinstance(event, ev.TimerExpired) and event.name == END_WAIT:
            out = self._end_waited()
        else:
            out = self.turns.handle(event, now)
        if self.ending and not self._closing and not self.turns.end_waits():
            out = [*out, *self._close_when_drained()]
        return out

    def _log(self, level: str, message: str) -> ev.Log:
        return ev.Log(level, f"session {self.session_id}: {message}")

    def _activity(self, event: ev.ClientActivity) -> list:
        self.timers.user_active(self.now)
        return []

    def _dtmf(self, event: ev.Dtmf) -> list:
        self.timers.user_active(self.now)
        turn = self.turns.turn
        return [ev.Emit("dtmf", {"digit": event.digit, "turn_number": turn.number if turn else 0})]

    def _tick(self, event: ev.Tick) -> list:
        if self._closing:
            return []
        if self.turns.user_speaking or self.turns.in_flight():
            self.timers.last_activity = self.now  # a turn in progress keeps the session alive
        decision = self.timers.check(self.now)
        if decision.reprompt:
            log = self._log("info", f"the user has been silent {self.user_idle_secs:.0f} s; re-prompting")
            return [log, *self.turns.handle(ev.Say(text=self.timers.prompt), self.now)]
        if not decision.end_reason:
            return []
        out = [self._log("info", f"ending: {pb.SessionEnded.Reason.Name(decision.end_reason)}")]
        if decision.end_reason == pb.SessionEnded.REASON_IDLE_TIMEOUT:
            out.append(ev.Emit("idle_timeout", {"idle_seconds": decision.idle_seconds, "user_idle": decision.user_idle}))
        return out + self._close(decision.end_reason)

    def _end(self, event: ev.End) -> list:
        """Let the user's pending turn and the bot's reply finish (at most END_TIMEOUT_S), then close."""
        if self.ending:
            return []
        self.ending = True
        out = []
        if self.turns.user_speaking:  # no more audio will come to end the speech
            out = list(self.turns.handle(ev.UserStopped(event.offset_ms, event.arrival), self.now))
        if self.turns.end_waits():
            out.append(ev.StartTimer(END_WAIT, None, self.now + END_TIMEOUT_S))
        return out

    def _end_waited(self) -> list:
        if not (self.ending and not self._closing and self.turns.end_waits()):
            return []
        number = self.turns.turn.number if self.turns.turn else 0
        warning = self._log("warning", f"End waited {END_TIMEOUT_S:.0f} s for turn {number}; closing")
        return [warning, *self._close_when_drained()]  # the turn gets REASON_SESSION_ENDED

    def _cancel(self, event: ev.Cancel) -> list:
        return self._close(pb.SessionEnded.REASON_CANCELLED)

    def _session_closing(self, event: ev.SessionClosing) -> list:
        self._closing = True
        return self.turns.handle(event, self.now)

    def _close(self, reason: int) -> list:
        self._closing = True
        return [ev.Close(reason)]

    def _close_when_drained(self) -> list:
        self._closing = True
        return [ev.CancelTimer(END_WAIT, None), ev.CloseWhenDrained(pb.SessionEnded.REASON_ENDED)]
