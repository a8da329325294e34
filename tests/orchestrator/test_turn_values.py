"""The numbers and records behind the turn rules: TurnEnded and Metrics fields, timer deadlines,
superseded turns kept in `awaiting`, mute as the session reads it. In-process, on a fake clock."""
from __future__ import annotations

import pytest

from turn_script import ASK_STEPS, Script, config
from voicemesh.orchestrator import turn_events as ev
from voicemesh.orchestrator.lifecycle import END_WAIT
from voicemesh.orchestrator.turns import AWAITING_FINAL, FINAL_GIVE_UP, FINAL_LATE, LISTENING, REPLYING, USER_SPEAKING
from voicemesh.v1 import orchestrator_pb2 as pb


def emitted(script: Script, event: str) -> list[dict]:
    return [effect.fields for effect in script.effects if isinstance(effect, ev.Emit) and effect.event == event]


def test_turn_ended_times_the_turn_from_its_audio():
    script = Script().run(ASK_STEPS + ["audio@1.5", "done@3"])
    (ended,) = emitted(script, "turn_ended")
    assert ended == {"turn_number": 1, "duration_seconds": 3.0, "interrupted": False, "latency_ms": 500.0,
                     "reason": pb.TurnEnded.REASON_ANSWERED}


def test_metrics_follow_turn_ended_with_the_reply_stats():
    script = Script(config(metrics=True)).run(ASK_STEPS + ["audio@1.5"])
    script.turn.llm_usage, script.turn.tts_characters = (12, 7), 30
    script.turn.ttfb_ms["llm"] = 80.0
    script.step("done@3")
    kinds = [effect.event for effect in script.effects if isinstance(effect, ev.Emit)]
    assert kinds[-2:] == ["turn_ended", "metrics"]
    (metrics,) = emitted(script, "metrics")
    assert metrics["ttfb_ms"] == {"stt": pytest.approx(200.0), "llm": 80.0}
    assert (metrics["voice_to_voice_ms"], metrics["llm_input_tokens"], metrics["llm_output_tokens"]) == (500.0, 12, 7)
    assert (metrics["tts_characters"], metrics["processing_ms"]) == (30, 3000.0)
    assert ev.RecordTtfb("stt", pytest.approx(200.0)) in script.effects


def test_an_interrupted_turn_says_so():
    script = Script().run(ASK_STEPS + ["audio@1.5", "start@2"])
    ended = emitted(script, "turn_ended")[0]
    assert (ended["interrupted"], ended["reason"], ended["duration_seconds"]) == (True, pb.TurnEnded.REASON_INTERRUPTED, 2.0)


def test_final_timers_run_from_the_stop_and_report_what_they_waited():
    script = Script().run(["start@0", "stop@1"])
    timers = {(t.name, t.deadline) for t in script.effects if isinstance(t, ev.StartTimer)}
    assert timers == {(FINAL_LATE, 3.0), (FINAL_GIVE_UP, 31.0)}
    script.step("wait@40")
    assert emitted(script, "turn_delayed") == [{"turn_number": 1, "waiting_for": "stt", "waited_seconds": 2.0}]
    (error,) = [e for e in script.effects if isinstance(e, ev.EmitError)]
    assert "30.0 s after the user stopped" in error.message and "final_transcript_give_up_secs" in error.message
    assert ev.CountDelayed("stt") in script.effects


def test_speaking_events_and_turn_context_carry_the_stream_offsets():
    script = Script().run(["start@0.25", "stop@1.5"])
    assert [f["offset_ms"] for f in emitted(script, "speaking")] == [250, 1500]
    (context,) = [e for e in script.effects if isinstance(e, ev.SendTurnStart)]
    (finalize,) = [e for e in script.effects if isinstance(e, ev.SendFinalize)]
    assert (context.offset_ms, finalize.offset_ms, finalize.resume) == (250, 1500, True)


def test_a_superseded_turn_waits_in_awaiting_until_its_final():
    script = Script().run(["start@0", "stop@1", "start@1.5"])
    assert list(script.turns.awaiting) == ["s-1"]
    script.run(["final#s-1:first@2", "eou#s-1@2"])
    assert script.turns.awaiting == {} and script.turns.unanswered


def test_the_final_releases_the_turn_before_its_end_of_utterance():
    # One final per Finalize (contract.md): the reply starts on it, one STT message sooner.
    script = Script().run(["start@0", "stop@1", "final:hello@1.2"])
    assert script.turns.state == REPLYING
    assert [type(effect) for effect in script.effects if isinstance(effect, ev.StartReply)] == [ev.StartReply]
    script.step("eou@1.2")
    assert [type(effect) for effect in script.effects if isinstance(effect, ev.StartReply)] == [ev.StartReply]


def test_a_superseded_turn_settles_on_its_final_alone():
    script = Script().run(["start@0", "stop@1", "start@1.5", "final#s-1:first@2"])
    assert script.turns.awaiting == {} and script.turns.unanswered
    script.step("eou#s-1@2")  # changes nothing: the final was counted
    assert script.turns.awaiting == {} and script.turns.state == USER_SPEAKING


def test_superseded_turns_settle_one_by_one():
    script = Script().run(["start@0", "stop@1", "start@1.05", "stop@1.5", "start@1.7"])
    # Turn 1 was superseded by turn 2, which is superseded by turn 3: both wait for their finals.
    assert list(script.turns.awaiting) == ["s-1", "s-2"]
    script.run(["final#s-1:one@2", "eou#s-1@2"])
    assert list(script.turns.awaiting) == ["s-2"]


def test_mute_as_the_session_reads_it():
    script = Script(config(mute_strategies=[pb.MUTE_STRATEGY_ALWAYS])).run(ASK_STEPS)
    assert not script.turns.muted()
    script.step("audio@1.5")
    assert script.turns.muted()  # the session sends the VAD and STT silence meanwhile
    script.step("done@2")
    assert not script.turns.muted()
    script.step("mute@3")
    assert script.turns.muted()


def test_idle_timeout_reports_how_long():
    script = Script(config(lifecycle=pb.LifecycleOptions(idle_timeout_secs=10))).run(["activity@2", "tick@12.5"])
    assert emitted(script, "idle_timeout") == [{"idle_seconds": 10.5, "user_idle": False}]


def test_end_waits_on_a_timer_it_cancels_when_the_turn_is_over():
    script = Script().run(ASK_STEPS + ["end@1.3"])
    assert ev.StartTimer(END_WAIT, None, 31.3) in script.effects
    script.step("done@2")
    assert script.effects[-2:] == [ev.CancelTimer(END_WAIT, None), ev.CloseWhenDrained(pb.SessionEnded.REASON_ENDED)]


def test_turn_numbers_and_ids():
    script = Script().run(["text:a@0", "text:b@1", "say:c@2"])
    assert [(f["turn_number"], f["turn_id"]) for f in emitted(script, "turn_started")] == [(1, "s-1"), (2, "s-2"), (3, "s-3")]
    assert script.turns.turn_count == 3


def test_states_of_a_turn():
    script = Script()
    states = [script.turns.state]
    for step in ["start@0", "stop@1", "start@1.05", "stop@1.5", "final:hi@1.6", "eou@1.6", "audio@2", "done@3"]:
        script.step(step)
        states.append(script.turns.state)
    # The final releases the turn (one final per Finalize); its EndOfUtterance changes nothing.
    assert states == [LISTENING, USER_SPEAKING, AWAITING_FINAL, USER_SPEAKING, AWAITING_FINAL, REPLYING, REPLYING, REPLYING,
                      LISTENING]
