"""The order the session carries out one event's effects in: the reply's LLM request goes ahead
of what only reports (effects._reply_first), and nothing else moves. In-process, no sockets."""
from __future__ import annotations

from turn_script import Script
from voicemesh.orchestrator import turn_events as ev
from voicemesh.orchestrator.effects import _reply_first


def _final_effects() -> list:
    script = Script().run(["start@0", "stop@1"])
    before = len(script.effects)
    script.step("final:hello@1.2")
    return script.effects[before:]


def test_the_reply_starts_before_the_final_is_reported():
    effects = _final_effects()
    kinds = [type(effect) for effect in effects]
    assert kinds.index(ev.Emit) < kinds.index(ev.StartReply), "the controller's story: the transcript, then the reply"
    ordered = [type(effect) for effect in _reply_first(effects)]
    assert ordered.index(ev.AddToContext) < ordered.index(ev.StartReply) < ordered.index(ev.Emit), ordered
    assert sorted(map(str, ordered)) == sorted(map(str, kinds)), "effects are moved, never dropped or added"


def test_the_reply_never_passes_an_effect_that_acts():
    # A CancelReply ahead of it cancels the reply before; passing it would cancel this one.
    start = next(effect for effect in _final_effects() if isinstance(effect, ev.StartReply))
    report, cancel = ev.Emit("user_transcript", {"text": "hello"}), ev.CancelReply()
    assert _reply_first([report, cancel, report, start]) == [report, cancel, start, report]


def test_effects_without_a_reply_keep_their_order():
    script = Script().run(["start@0"])
    effects = list(script.effects)
    assert _reply_first(effects) == effects
