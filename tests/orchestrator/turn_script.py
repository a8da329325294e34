"""Drives a session's control plane (SessionLifecycle in front of the TurnController) the way a
Session does, on a fake clock, and tells what it did.

A script is a list of steps, each `verb[#turn_id][:text][@time]`:

    start, stop             the VAD: user speech started / stopped
    final:TEXT, interim:TEXT, pause:TEXT, eou
                            the STT (for the turn #turn_id, else the current turn)
    audio, spoke:TEXT, done, fail
                            the current turn's reply: first audio out, a segment spoken, played to
                            the end, failed
    spec_fail               the current turn's speculation failed
    text:TEXT, say:TEXT, generate:TEXT, interrupt, mute, unmute, dtmf:D, end, cancel, activity
                            the client (generate: Say with an instruction)
    tools_on, tools_off     a tool call started / all finished
    tick                    the session's timer check
    wait                    only moves the clock (timers that are due fire, in order)
    closing                 the session is over (SessionClosing)

Time defaults to 0.1 s after the previous step. Timers (StartTimer effects) fire when the
clock passes their deadline, as the session's event loop would fire them. A SendFinalize
that asks to resume is answered with FinalizeSent at once, as the session does once written.

`story()` is the effects as short lines; Log, metrics, timers, the playout clock, clearing
the playout (always with cancel_reply) and closing the reply calls are left out.
"""
from __future__ import annotations

from voicemesh.orchestrator import turn_events as ev
from voicemesh.orchestrator.lifecycle import SessionLifecycle
from voicemesh.orchestrator.turns import TurnController
from voicemesh.v1 import orchestrator_pb2 as pb

SESSION_ID = "s"
ASK_STEPS = ["start@0", "stop@1", "final:hello@1.2", "eou@1.2"]  # a spoken turn up to its reply
_QUIET = (ev.Log, ev.CountDelayed, ev.RecordTtfb, ev.StartTimer, ev.CancelTimer, ev.ResetPlayoutClock, ev.ClearPlayout,
          ev.CloseReplyCalls, ev.TurnOpened)


def config(**fields) -> pb.SessionConfig:
    return pb.SessionConfig(session_id=SESSION_ID, **fields)


class Script:
    def __init__(self, session_config: pb.SessionConfig | None = None, now: float = 0.0):
        self.controller = SessionLifecycle(session_config or config(), now)
        self.now = now
        self.effects: list = []
        self.timers: list[ev.StartTimer] = []

    @property
    def turns(self) -> TurnController:
        return self.controller.turns

    @property
    def turn(self) -> ev.Turn | None:
        return self.controller.turns.turn

    def feed(self, event, now: float | None = None) -> list:
        if now is not None:
            self.advance(now)
        effects = self.controller.handle(event, self.now)
        self.effects.extend(effects)
        for effect in effects:
            if isinstance(effect, ev.StartTimer):
                self.timers = [t for t in self.timers if (t.name, t.turn) != (effect.name, effect.turn)] + [effect]
            elif isinstance(effect, ev.CancelTimer):
                self.timers = [t for t in self.timers if (t.name, t.turn) != (effect.name, effect.turn)]
            elif isinstance(effect, ev.SendFinalize) and effect.resume:
                self.feed(ev.FinalizeSent(effect.turn))
        return effects

    def advance(self, now: float) -> None:
        """Move the clock to `now`, firing the timers due on the way."""
        while True:
            due = sorted((t for t in self.timers if t.deadline <= now), key=lambda t: t.deadline)
            if not due:
                break
            timer = due[0]
            self.timers.remove(timer)
            self.now = max(self.now, timer.deadline)
            self.feed(ev.TimerExpired(timer.name, timer.turn))
        self.now = max(self.now, now)

    def run(self, steps: list[str]) -> "Script":
        for step in steps:
            self.step(step)
        return self

    def step(self, step: str) -> None:
        head, at, when = step.rpartition("@") if "@" in step else ("", "", "")
        if not at:
            head, when = step, ""
        now = float(when) if when else round(self.now + 0.1, 6)
        verb, _, text = head.partition(":")
        verb, _, turn_id = verb.partition("#")
        self.advance(now)
        event = self._event(verb, text, turn_id or (self.turn.turn_id if self.turn else ""))
        if event is not None:
            self.feed(event)

    def _event(self, verb: str, text: str, turn_id: str):
        offset = int(self.now * 1000)
        turn = self.turn
        simple = {
            "start": lambda: ev.UserStarted(offset, self.now), "stop": lambda: ev.UserStopped(offset, self.now),
            "final": lambda: ev.Transcript(turn_id, text, is_final=True, confidence=0.9),
            "interim": lambda: ev.Transcript(turn_id, text, stability=0.5),
            "pause": lambda: ev.Transcript(turn_id, text, at_pause=True, stability=0.5),
            "eou": lambda: ev.EndOfUtterance(turn_id), "audio": lambda: ev.ReplyFirstAudio(turn.number),
            "done": lambda: ev.ReplyDone(turn), "fail": lambda: ev.ReplyFailed(turn, "UNAVAILABLE", "llm down"),
            "spec_fail": lambda: ev.SpeculationFailed(turn, turn.speculation),
            "text": lambda: ev.TypedText(text), "say": lambda: ev.Say(text=text), "generate": lambda: ev.Say(instruction=text),
            "interrupt": ev.Interrupt, "mute": lambda: ev.Mute(True), "unmute": lambda: ev.Mute(False),
            "dtmf": lambda: ev.Dtmf(text), "end": lambda: ev.End(offset, self.now), "cancel": ev.Cancel,
            "activity": ev.ClientActivity, "tools_on": lambda: ev.ToolsChanged(True), "tools_off": lambda: ev.ToolsChanged(False),
            "tick": ev.Tick, "closing": ev.SessionClosing,
        }
        if verb == "spoke":
            turn.spoken.append(text)  # what the reply does when a segment has been sent
            return None
        if verb == "wait":
            return None
        return simple[verb]()

    def story(self) -> list[str]:
        return [line for effect in self.effects if not isinstance(effect, _QUIET) for line in [describe(effect)]]


def _short(enum, value: int) -> str:
    return enum.Name(value).split("_", 1)[1]


def describe(effect) -> str:
    if isinstance(effect, ev.Emit):
        f = effect.fields
        if effect.event == "speaking":
            return f"{_short(pb.SpeakingEvent.Kind, f['kind']).lower()} {f['turn_number']}"
        if effect.event == "turn_ended":
            return f"turn_ended {f['turn_number']} {_short(pb.TurnEnded.Reason, f['reason'])}"
        if effect.event == "user_transcript":
            return f"{'transcript' if f['is_final'] else 'interim'} {f['turn_number']} {f['text']!r}"
        if effect.event == "idle_timeout":
            return "idle_timeout" + (" user" if f["user_idle"] else "")
        if effect.event == "dtmf":
            return f"dtmf {f['digit']} {f['turn_number']}"
        if effect.event == "turn_started":
            return f"turn_started {f['turn_number']} {f['turn_id']}"
        return f"{effect.event} {f.get('turn_number', '')}".strip()
    if isinstance(effect, ev.EmitError):
        return f"error {effect.code} {effect.source}"
    if isinstance(effect, ev.AddToContext):
        return f"context {effect.role}{'*' if effect.interrupted else ''} {effect.text!r}"
    if isinstance(effect, (ev.Close, ev.CloseWhenDrained)):
        name = "close" if isinstance(effect, ev.Close) else "close_when_drained"
        return f"{name} {_short(pb.SessionEnded.Reason, effect.reason)}"
    if isinstance(effect, ev.Speculate):
        return f"speculate {effect.speculation.text!r}"
    if isinstance(effect, ev.StartBotReply):
        return f"bot_reply {effect.turn.number} {effect.text or effect.instruction!r}"
    named = {ev.SendTurnStart: "turn_context", ev.SendFinalize: "finalize", ev.OpenReplyCalls: "open_calls"}
    if type(effect) in named:
        return f"{named[type(effect)]} {effect.turn.turn_id}"
    if isinstance(effect, ev.StartReply):
        return f"reply {effect.turn.number}"
    if isinstance(effect, ev.TurnFinished):
        return f"span_end {effect.turn.number}"
    if isinstance(effect, ev.CancelTools):
        return f"cancel_tools {effect.reason}"
    return {ev.ConfirmSpeculation: "confirm", ev.DropSpeculation: "drop", ev.CancelReply: "cancel_reply"}[type(effect)]
