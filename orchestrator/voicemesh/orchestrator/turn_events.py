"""What goes in and out of the turn controller (turns.py): events in, effects out, plain values.

Events are facts the session observed (the VAD heard speech start, a transcript came, the
reply's first audio left, a timer fired). Effects are what the controller asks the session to
do (send a TurnContext, open the reply calls, cancel the reply, emit a ConverseResponse). Both
are small dataclasses; neither holds a stream, a task or a clock. A `Turn` is the controller's
record of one turn; the session hangs its span on it, and the reply fills in its stats
(`spoken`, `llm_usage`, `ttfb_ms`, `tts_characters`), which the controller reads when the turn ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class Speculation:
    """A reply started on the transcript of a pause; its audio is held until the turn is confirmed."""

    text: str
    settled: int = 0  # the session's settled superseded turns when it started (more since: stale)


@dataclass(eq=False)
class Turn:
    """Everything the controller tracks about one turn (compared by identity)."""

    number: int
    turn_id: str
    started_at: float = 0.0  # when the turn's first audio (or text) reached the orchestrator
    user_text: str = ""
    user_end_at: float | None = None  # when the end of the user's speech reached us
    first_audio_at: float | None = None
    replying: bool = False
    ended: bool = False
    speculation: Speculation | None = None  # a reply started at a pause, not yet confirmed
    finalize_sent_at: float | None = None
    pending_finals: int = 0  # Finalize sent, its final transcript not yet received
    timers: set[str] = field(default_factory=set)  # names of the timers running for this turn
    delayed: bool = False  # TurnDelayed already sent
    ended_as: tuple = ()  # (duration s, interrupted, reason name), set when the turn ends
    # Filled in by the reply (and the session), read by the controller when the turn ends:
    spoken: list[str] = field(default_factory=list)  # bot text actually sent to the caller
    llm_usage: tuple[int, int] = (0, 0)
    ttfb_ms: dict[str, float] = field(default_factory=dict)  # per service, for the Metrics event
    tts_characters: int = 0
    llm_queued: int = 0  # Queued messages from the LLM: it is busy with others, not hung
    span: object = None  # the turn's span (opentelemetry Span), set by the tracing observer

    @property
    def latency_ms(self) -> float:
        if self.user_end_at is None or self.first_audio_at is None:
            return 0.0
        return max(0.0, (self.first_audio_at - self.user_end_at) * 1000)


# ---- events in ----------------------------------------------------------------------
@dataclass(frozen=True)
class UserStarted:
    """VAD speech started. `arrival`: when the audio at `offset_ms` reached the orchestrator."""
    offset_ms: int
    arrival: float


@dataclass(frozen=True)
class UserStopped:
    offset_ms: int
    arrival: float


@dataclass(frozen=True)
class FinalizeSent:
    """The Finalize asked for by SendFinalize(resume=True) has been written."""
    turn: Turn


@dataclass(frozen=True)
class Transcript:
    turn_id: str
    text: str
    is_final: bool = False
    at_pause: bool = False
    stability: float = 0.0
    confidence: float = 0.0
    language: str = ""


@dataclass(frozen=True)
class EndOfUtterance:
    turn_id: str


@dataclass(frozen=True)
class TypedText:
    text: str


@dataclass(frozen=True)
class ClientActivity:
    """A control or tool result from the client (text and DTMF count by themselves)."""


@dataclass(frozen=True)
class Dtmf:
    digit: str


@dataclass(frozen=True)
class Interrupt:
    pass


@dataclass(frozen=True)
class Say:
    """The bot speaks on its own (greeting, say, re-prompt, append_context with run_llm): fixed
    text, or an LLM reply to the context plus an instruction that is not kept in it."""
    text: str = ""
    instruction: str | None = None


@dataclass(frozen=True)
class Mute:
    muted: bool


@dataclass(frozen=True)
class ReplyFirstAudio:
    turn_number: int


@dataclass(frozen=True)
class ReplyDone:
    """The reply was played to the end."""
    turn: Turn


@dataclass(frozen=True)
class ReplyFailed:
    turn: Turn
    code: str
    details: str


@dataclass(frozen=True)
class SpeculationFailed:
    turn: Turn
    speculation: Speculation


@dataclass(frozen=True)
class ToolsChanged:
    """A tool call started or finished; `in_progress`: some are still waiting for the client."""
    in_progress: bool


@dataclass(frozen=True)
class TimerExpired:
    name: str
    turn: Turn | None = None


@dataclass(frozen=True)
class Tick:
    """The session's timers are checked (idle timeout, user idle, maximum duration)."""


@dataclass(frozen=True)
class End:
    """The client's End: the user's pending turn and the bot's reply finish, then the session closes.
    `offset_ms`/`arrival`: the end of the audio received, which ends speech still in progress."""
    offset_ms: int = 0
    arrival: float = 0.0


@dataclass(frozen=True)
class Cancel:
    pass


@dataclass(frozen=True)
class SessionClosing:
    """The session is over: the turn in flight ends (REASON_SESSION_ENDED)."""


# ---- effects out ---------------------------------------------------------------------
@dataclass(frozen=True)
class Emit:
    """Send the caller ConverseResponse(<event>=<message built from fields>); see events.py."""
    event: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EmitError:
    """A non-fatal in-band Error, counted by code and source."""
    code: str
    message: str
    source: str


@dataclass(frozen=True)
class Log:
    level: str  # "debug", "info", "warning"
    message: str


@dataclass(frozen=True)
class CountDelayed:
    waiting_for: str


@dataclass(frozen=True)
class RecordTtfb:
    service: str
    ms: float


@dataclass(frozen=True)
class SendTurnStart:
    """TurnContext to the VAD and STT streams (after flushing the STT's pre-roll)."""
    turn: Turn
    offset_ms: int


@dataclass(frozen=True)
class SendFinalize:
    """Flush the STT up to `offset_ms`, then Finalize; `resume`: feed FinalizeSent afterwards."""
    turn: Turn
    offset_ms: int
    resume: bool


@dataclass(frozen=True)
class OpenReplyCalls:
    turn: Turn


@dataclass(frozen=True)
class CloseReplyCalls:
    turn: Turn


@dataclass(frozen=True)
class StartReply:
    """A reply to the context as it stands, on the turn's calls if it has them."""
    turn: Turn


@dataclass(frozen=True)
class StartBotReply:
    """A bot-only turn's reply: fixed text (TTS only), or the LLM on the context plus `instruction`."""
    turn: Turn
    text: str = ""
    instruction: str | None = None


@dataclass(frozen=True)
class Speculate:
    turn: Turn
    speculation: Speculation


@dataclass(frozen=True)
class ConfirmSpeculation:
    """The speculation becomes the reply; its held audio plays now; the turn's own calls close."""
    turn: Turn
    speculation: Speculation


@dataclass(frozen=True)
class DropSpeculation:
    speculation: Speculation


@dataclass(frozen=True)
class CancelReply:
    pass


@dataclass(frozen=True)
class CancelTools:
    reason: str


@dataclass(frozen=True)
class ClearPlayout:
    turn_number: int  # the interrupted turn: its audio, and any earlier turn's, never plays again


@dataclass(frozen=True)
class ResetPlayoutClock:
    pass


@dataclass(frozen=True)
class AddToContext:
    role: str  # "user" or "assistant"
    text: str
    interrupted: bool = False


@dataclass(frozen=True)
class StartTimer:
    name: str
    turn: Turn | None
    deadline: float  # on the controller's clock


@dataclass(frozen=True)
class CancelTimer:
    name: str
    turn: Turn | None


@dataclass(frozen=True)
class TurnOpened:
    """Lifecycle: a turn started (its span starts)."""
    turn: Turn


@dataclass(frozen=True)
class TurnFinished:
    """Lifecycle: a turn is over for good (its span ends): when it ends, or, for a superseded
    turn, when its final came (or the session ended)."""
    turn: Turn


@dataclass(frozen=True)
class Close:
    reason: int  # a SessionEnded.Reason


@dataclass(frozen=True)
class CloseWhenDrained:
    """Close once the playout has sent everything queued (End)."""
    reason: int


ASYNC_EFFECTS = (SendTurnStart, SendFinalize)  # the session awaits these (stream writes)
