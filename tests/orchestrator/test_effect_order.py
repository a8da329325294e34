"""The order the session carries out one event's effects in: the reply's LLM request goes ahead
of what only reports (effects._reply_first), and nothing else moves. In-process, no sockets."""
from __future__ import annotations

from turn_script import Script
from voicemesh.orchestrator import turn_events as ev
from voicemesh.orchestrator.effects import _TellObservers, _UpdateContext, _reply_first


def _final_effects() -> list:
    script = Script().run(["start@0", "stop@1"])
    before = len(script.effects)
    script.step("final:hello@1.2")
    return script.effects[before:]


def _as_controller_said(effects: list) -> list:
    """Each effect as the controller gave it: an AddToContext split by _reply_first counts once,
    where its observers hear of it."""
    return [effect.effect if isinstance(effect, _TellObservers) else effect
            for effect in effects if not isinstance(effect, _UpdateContext)]


def test_the_reply_starts_before_the_final_is_reported():
    effects = _final_effects()
    kinds = [type(effect) for effect in effects]
    assert kinds.index(ev.Emit) < kinds.index(ev.StartReply), "the controller's story: the transcript, then the reply"
    ordered = _reply_first(effects)
    types = [type(effect) for effect in ordered]
    assert types.index(_UpdateContext) < types.index(ev.StartReply) < types.index(ev.Emit), types
    # Moved, never dropped or added; and apart from the reply, nothing changes order, the
    # observers' half of the context included (a recorder's transcript entry reaches the caller).
    reply = next(effect for effect in ordered if type(effect) is ev.StartReply)
    assert [e for e in _as_controller_said(ordered) if e is not reply] == [e for e in effects if e is not reply]
    assert [e.effect for e in ordered if isinstance(e, _UpdateContext)] == [e for e in effects if type(e) is ev.AddToContext]


def test_the_reply_never_passes_an_effect_that_acts():
    # A CancelReply ahead of it cancels the reply before; passing it would cancel this one.
    start = next(effect for effect in _final_effects() if isinstance(effect, ev.StartReply))
    report, cancel = ev.Emit("user_transcript", {"text": "hello"}), ev.CancelReply()
    assert _reply_first([report, cancel, report, start]) == [report, cancel, start, report]


def test_effects_without_a_reply_keep_their_order():
    script = Script().run(["start@0"])
    effects = list(script.effects)
    assert _reply_first(effects) == effects
