"""Per-session policies with no I/O of their own: when the user is muted, and the timers
that end or nudge a quiet session. The turn controller feeds them facts (and the time: they
never read a clock) and asks them questions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from voicemesh.v1 import orchestrator_pb2 as pb

DEFAULT_IDLE_TIMEOUT_S = 300.0
DEFAULT_USER_IDLE_RETRIES = 2
DEFAULT_USER_IDLE_PROMPT = "Are you still there?"


class TurnLifecycle(Protocol):
    """What a policy hears of the turns (the turn controller tells each policy in order)."""

    def user_active(self, now: float) -> None:
        """The user spoke or typed (the session adds DTMF, controls and tool results)."""

    def bot_started(self, now: float) -> None:
        """A reply's first audio left."""

    def turn_ended(self, replied: bool, spoke: bool, now: float) -> None:
        """A turn ended; `replied`: the bot had the floor (a reply ran); `spoke`: its audio went out."""


class MuteState:
    """Whether the user's audio is ignored right now (no transcripts, no barge-in)."""

    def __init__(self, strategies):
        self.strategies = set(strategies)
        self.client_muted = False
        self.bot_speaking = False
        self.first_speech_done = False  # the bot's first reply has finished
        self.first_turn_complete = False
        self.tools_in_progress = False

    def user_active(self, now: float) -> None:
        pass

    def bot_started(self, now: float) -> None:
        self.bot_speaking = True

    def turn_ended(self, replied: bool, spoke: bool, now: float) -> None:
        if replied:
            self.first_speech_done = self.first_speech_done or spoke  # the bot's first reply has been heard
            self.first_turn_complete = True
        self.bot_speaking = False

    def muted(self) -> bool:
        if self.client_muted:
            return True
        if pb.MUTE_STRATEGY_ALWAYS in self.strategies and self.bot_speaking:
            return True
        if pb.MUTE_STRATEGY_FIRST_SPEECH in self.strategies and self.bot_speaking and not self.first_speech_done:
            return True
        if pb.MUTE_STRATEGY_UNTIL_FIRST_BOT_COMPLETE in self.strategies and not self.first_turn_complete:
            return True
        return pb.MUTE_STRATEGY_FUNCTION_CALL in self.strategies and self.tools_in_progress


@dataclass
class TimerDecision:
    end_reason: int = 0  # a SessionEnded.Reason, or 0
    user_idle: bool = False
    reprompt: bool = False
    idle_seconds: float = 0.0


class SessionTimers:
    """Idle timeout, user-idle re-prompts and the maximum duration, checked on a tick."""

    def __init__(self, options: pb.LifecycleOptions, now: float):
        self.idle_timeout = options.idle_timeout_secs or DEFAULT_IDLE_TIMEOUT_S
        self.user_idle = options.user_idle_secs
        self.retries_allowed = options.user_idle_retries or DEFAULT_USER_IDLE_RETRIES
        self.prompt = options.user_idle_prompt or DEFAULT_USER_IDLE_PROMPT
        self.max_duration = options.max_duration_secs
        self.started = now
        self.last_activity = now
        self.waiting_since: float | None = None  # the bot finished and the user has not answered
        self.retries = 0

    def user_active(self, now: float) -> None:
        """The user spoke, typed or sent a control."""
        self.last_activity = now
        self.waiting_since = None
        self.retries = 0

    def turn_ended(self, replied: bool, spoke: bool, now: float) -> None:
        if replied:  # the user's turn to speak: user_idle_secs counts from here
            self.waiting_since = now

    def bot_started(self, now: float) -> None:
        self.waiting_since = None

    def check(self, now: float) -> TimerDecision:
        if self.max_duration and now - self.started >= self.max_duration:
            return TimerDecision(end_reason=pb.SessionEnded.REASON_MAX_DURATION)
        if now - self.last_activity >= self.idle_timeout:
            return TimerDecision(end_reason=pb.SessionEnded.REASON_IDLE_TIMEOUT, idle_seconds=now - self.last_activity)
        if self.user_idle and self.waiting_since is not None and now - self.waiting_since >= self.user_idle:
            if self.retries >= self.retries_allowed:
                return TimerDecision(end_reason=pb.SessionEnded.REASON_IDLE_TIMEOUT, user_idle=True,
                                     idle_seconds=now - self.waiting_since)
            self.retries += 1
            self.waiting_since = None  # until the re-prompt has been spoken
            return TimerDecision(reprompt=True)
        return TimerDecision()
