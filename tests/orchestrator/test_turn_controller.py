"""Every turn rule of docs/conversation.md, one table row each, on the control plane alone:
no processes, no sockets, no sleeps (the clock is a number; see turn_script.py)."""
from __future__ import annotations

import pytest

from turn_script import Script, config
from voicemesh.v1 import orchestrator_pb2 as pb

# A spoken turn up to its reply, and the reply heard to its end (or cut off).
ASK = ["start@0", "stop@1", "final:hello@1.2", "eou@1.2"]
STOPPED = ["turn_started 1 s-1", "user_started 1", "turn_context s-1", "user_stopped 1", "finalize s-1", "open_calls s-1"]
ASKED = STOPPED + ["transcript 1 'hello'", "context user 'hello'", "reply 1"]
SPEAKING = ["audio@1.5", "spoke:Hi there.@1.6"]
SPOKE = ASKED + ["bot_started 1"]
ANSWERED = ["context assistant 'Hi there.'", "bot_stopped 1", "span_end 1", "turn_ended 1 ANSWERED"]
CUT = ["cancel_reply", "cancel_tools interrupted", "clear_playback 1", "context assistant* 'Hi there.'", "bot_stopped 1",
       "span_end 1", "turn_ended 1 INTERRUPTED"]
CUT_SILENT = ["cancel_reply", "cancel_tools interrupted", "span_end 1", "turn_ended 1 INTERRUPTED"]  # before any audio
TURN_2 = ["turn_started 2 s-2", "user_started 2", "turn_context s-2"]
# Speech after the user's stop supersedes turn 1 (still waiting for its final: its span stays open).
SUPERSEDED = STOPPED + ["cancel_reply", "cancel_tools interrupted", "turn_ended 1 INTERRUPTED"] + TURN_2
FIRST_SETTLES = ["final#s-1:first@2", "eou#s-1@2"]
SETTLED = ["transcript 1 'first'", "context user 'first'", "span_end 1"]
SECOND = ["stop@4", "final:second@4.1", "eou@4.1"]
SECOND_STOPPED = ["user_stopped 2", "finalize s-2", "open_calls s-2"]
MIN_WORDS_2 = {"interruptions": pb.InterruptionOptions(min_words=2)}

ROWS = [
    # name, config, steps, expected story
    ("spoken turn answered", {}, ASK + SPEAKING + ["done@3"], SPOKE + ANSWERED),
    ("interim transcripts off by default", {}, ["start@0", "interim:hel@0.5"], STOPPED[:3]),
    ("interim transcripts on", {"interim_transcripts": True}, ["start@0", "interim:hel@0.5"], STOPPED[:3] + ["interim 1 'hel'"]),
    ("late result for an ended turn is ignored", {}, ASK + SPEAKING + ["done@3", "final#s-1:again@3.1", "eou#s-1@3.1"],
     SPOKE + ANSWERED),
    ("speech resumes before the stop (Smart Turn held the pause): same turn", {}, ["start@0", "start@0.5"],
     STOPPED[:3] + ["user_started 1", "turn_context s-1"]),
    ("no words: no speech", {}, ["start@0", "stop@1", "final:@1.2", "eou@1.2"],
     STOPPED + ["transcript 1 ''", "span_end 1", "turn_ended 1 NO_SPEECH"]),
    # -- barge-in
    ("barge-in cuts the reply; the context keeps only what was spoken", {}, ASK + SPEAKING + ["start@2"], SPOKE + CUT + TURN_2),
    ("barge-in before any audio: nothing to clear, nothing in the context", {}, ASK + ["start@1.3"], ASKED + CUT_SILENT + TURN_2),
    ("allow=false: speech over the bot is ignored", {"interruptions": pb.InterruptionOptions(allow=False)},
     ASK + SPEAKING + ["start@2", "stop@2.5", "done@3"], SPOKE + ANSWERED),
    ("min_words: too few words, the bot goes on", MIN_WORDS_2,
     ASK + SPEAKING + ["start@2", "interim#s-2.1:yes@2.2", "stop@2.5", "final#s-2.1:yes@2.6", "eou#s-2.1@2.6", "done@3"],
     SPOKE + ["turn_context s-2.1", "finalize s-2.1"] + ANSWERED),
    ("min_words reached in an interim: barge-in", MIN_WORDS_2,
     ASK + SPEAKING + ["start@2", "interim#s-2.1:stop now@2.2", "stop@2.5", "final#s-2.1:stop now please@2.6", "eou#s-2.1@2.6"],
     SPOKE + ["turn_context s-2.1"] + CUT + ["turn_started 2 s-2.1", "user_started 2", "user_stopped 2", "finalize s-2.1",
                                            "open_calls s-2.1", "transcript 2 'stop now please'",
                                            "context user 'stop now please'",
                                            "reply 2"]),
    ("min_words reached in the final after the stop: barge-in and the reply at once", MIN_WORDS_2,
     ASK + SPEAKING + ["start@2", "stop@2.5", "final#s-2.1:stop now@2.6"],
     SPOKE + ["turn_context s-2.1", "finalize s-2.1"] + CUT + ["turn_started 2 s-2.1", "user_started 2",
                                                              "transcript 2 'stop now'",
                                                              "context user 'stop now'", "reply 2"]),
    ("min_words: the bot finished before the speech's final: it becomes the next turn",
     {"interruptions": pb.InterruptionOptions(min_words=3)},
     ASK + SPEAKING + ["start@2", "stop@2.5", "done@3", "final#s-2.1:wait@3.2", "eou#s-2.1@3.2"],
     SPOKE + ["turn_context s-2.1", "finalize s-2.1"] + ANSWERED
     + ["turn_started 2 s-2.1", "user_started 2", "transcript 2 'wait'", "context user 'wait'", "reply 2"]),
    ("min_words: the bot finished, then new speech: the pending speech becomes a turn first", MIN_WORDS_2,
     ASK + SPEAKING + ["start@2", "stop@2.5", "done@3", "start@3.5"],
     SPOKE + ["turn_context s-2.1", "finalize s-2.1"] + ANSWERED
     + ["turn_started 2 s-2.1", "user_started 2", "cancel_reply", "cancel_tools interrupted", "turn_ended 2 INTERRUPTED",
        "turn_started 3 s-3", "user_started 3", "turn_context s-3"]),
    ("interrupt control stops the bot", {}, ASK + SPEAKING + ["interrupt@2"], SPOKE + CUT),
    ("interrupt with nothing in flight does nothing", {}, ["interrupt@0"], []),
    # -- speculation
    ("speculation confirmed by the same words", {},
     ["start@0", "pause:Hello there@0.9", "stop@1", "final:hello there.@1.2", "eou@1.2"],
     STOPPED[:3] + ["speculate 'Hello there'"] + STOPPED[3:] + ["transcript 1 'hello there.'", "context user 'hello there.'",
                                                               "confirm"]),
    ("speculation dropped on other words", {}, ["start@0", "pause:Hello@0.9", "stop@1", "final:hello there@1.2", "eou@1.2"],
     STOPPED[:3] + ["speculate 'Hello'"] + STOPPED[3:] + ["transcript 1 'hello there'", "context user 'hello there'", "drop",
                                                         "reply 1"]),
    ("the same words again keep the speculation; new words replace it", {},
     ["start@0", "pause:Hello@0.5", "pause:hello.@0.6", "pause:Hello you@0.9"],
     STOPPED[:3] + ["speculate 'Hello'", "drop", "speculate 'Hello you'"]),
    ("failed speculation: a fresh reply on the final", {},
     ["start@0", "pause:hi@0.9", "spec_fail@0.95", "stop@1", "final:hi@1.2", "eou@1.2"],
     STOPPED[:3] + ["speculate 'hi'"] + STOPPED[3:] + ["transcript 1 'hi'", "context user 'hi'", "reply 1"]),
    ("barge-in drops the speculation", {}, ["start@0", "pause:hi@0.9", "stop@1", "start@1.5"],
     STOPPED[:3] + ["speculate 'hi'"] + STOPPED[3:] + ["cancel_reply", "drop", "cancel_tools interrupted",
                                                      "turn_ended 1 INTERRUPTED"] + TURN_2),
    ("speculation made before a superseded turn settled is not confirmed", {},
     ["start@0", "stop@1", "start@1.5", "pause:second@1.9"] + FIRST_SETTLES + ["stop@2.1", "final:second@2.2", "eou@2.2"],
     SUPERSEDED + ["speculate 'second'"] + SETTLED + SECOND_STOPPED + ["transcript 2 'second'", "context user 'second'", "drop",
                                                                      "reply 2"]),
    # -- no turn is lost
    ("late final: TurnDelayed, then answered", {}, ["start@0", "stop@1", "wait@3.5", "final:hello@4", "eou@4"],
     STOPPED + ["turn_delayed 1", "transcript 1 'hello'", "context user 'hello'", "reply 1"]),
    ("missing final: given up with an error", {}, ["start@0", "stop@1", "wait@40"],
     STOPPED + ["turn_delayed 1", "error DEADLINE_EXCEEDED stt", "span_end 1", "turn_ended 1 STT_TIMEOUT"]),
    ("final timeouts as configured", {"turn": pb.TurnOptions(final_transcript_timeout_secs=0.5, final_transcript_give_up_secs=1)},
     ["start@0", "stop@1", "wait@1.49", "wait@1.6", "wait@1.99", "wait@2.1"],
     STOPPED + ["turn_delayed 1", "error DEADLINE_EXCEEDED stt", "span_end 1", "turn_ended 1 STT_TIMEOUT"]),
    ("a final in time cancels the timers", {}, ASK + ["wait@40"], ASKED),
    ("superseded turn: its words join the context first, the reply answers both", {},
     ["start@0", "stop@1", "start@1.5"] + FIRST_SETTLES + SECOND,
     SUPERSEDED + SETTLED + SECOND_STOPPED + ["transcript 2 'second'", "context user 'second'", "reply 2"]),
    ("a superseded turn's final after the next turn's stop still comes first", {},
     ["start@0", "stop@1", "start@1.5", "stop@2"] + FIRST_SETTLES + ["final:second@2.1", "eou@2.1"],
     SUPERSEDED + SECOND_STOPPED + SETTLED + ["transcript 2 'second'", "context user 'second'", "reply 2"]),
    ("a superseding turn without words answers the superseded words", {},
     ["start@0", "stop@1", "start@1.5"] + FIRST_SETTLES + ["stop@4", "final:@4.1", "eou@4.1"],
     SUPERSEDED + SETTLED + SECOND_STOPPED + ["transcript 2 ''", "reply 2"]),
    # -- mute strategies
    ("client mute ignores speech", {}, ["mute@0", "start@0.1", "stop@1", "unmute@2", "start@3"], STOPPED[:3]),
    ("MUTE_STRATEGY_ALWAYS: muted while the bot speaks", {"mute_strategies": [pb.MUTE_STRATEGY_ALWAYS]},
     ASK + SPEAKING + ["start@2", "stop@2.2", "done@3", "start@4"], SPOKE + ANSWERED + TURN_2),
    ("MUTE_STRATEGY_ALWAYS: not before the first audio", {"mute_strategies": [pb.MUTE_STRATEGY_ALWAYS]}, ASK + ["start@1.3"],
     ASKED + CUT_SILENT + TURN_2),
    ("MUTE_STRATEGY_FIRST_SPEECH: only the first reply", {"mute_strategies": [pb.MUTE_STRATEGY_FIRST_SPEECH]},
     ["say:Welcome@0", "audio@0.1", "start@0.5", "done@1", "say:Again@2", "audio@2.1", "start@2.5"],
     ["turn_started 1 s-1", "bot_reply 1 'Welcome'", "bot_started 1", "bot_stopped 1", "span_end 1", "turn_ended 1 ANSWERED",
      "turn_started 2 s-2", "bot_reply 2 'Again'", "bot_started 2", "cancel_reply", "cancel_tools interrupted",
      "clear_playback 2",
      "bot_stopped 2", "span_end 2", "turn_ended 2 INTERRUPTED", "turn_started 3 s-3", "user_started 3", "turn_context s-3"]),
    ("MUTE_STRATEGY_UNTIL_FIRST_BOT_COMPLETE", {"mute_strategies": [pb.MUTE_STRATEGY_UNTIL_FIRST_BOT_COMPLETE]},
     ["start@0", "say:Welcome@0.5", "start@0.6", "done@1", "start@2"],
     ["turn_started 1 s-1", "bot_reply 1 'Welcome'", "span_end 1", "turn_ended 1 ANSWERED"] + TURN_2),
    ("MUTE_STRATEGY_FUNCTION_CALL: muted while a tool runs", {"mute_strategies": [pb.MUTE_STRATEGY_FUNCTION_CALL]},
     ASK + ["tools_on@1.4", "start@1.5", "tools_off@2", "start@2.1"], ASKED + CUT_SILENT + TURN_2),
    # -- tools
    ("barge-in during a tool call cancels it", {}, ASK + ["tools_on@1.4", "start@1.5"], ASKED + CUT_SILENT + TURN_2),
    # -- the bot speaking on its own, typed text, DTMF
    ("greeting / say: a bot-only turn", {}, ["say:Hello!@0", "audio@0.1", "spoke:Hello!@0.2", "done@1"],
     ["turn_started 1 s-1", "bot_reply 1 'Hello!'", "bot_started 1", "context assistant 'Hello!'", "bot_stopped 1", "span_end 1",
      "turn_ended 1 ANSWERED"]),
    ("generated greeting", {}, ["generate:Introduce yourself@0"], ["turn_started 1 s-1", "bot_reply 1 'Introduce yourself'"]),
    ("say interrupts the reply in progress", {}, ASK + SPEAKING + ["say:Sorry@2"],
     SPOKE + CUT + ["turn_started 2 s-2", "bot_reply 2 'Sorry'"]),
    ("typed text is a turn", {}, ["text:hi there@0"],
     ["turn_started 1 s-1", "transcript 1 'hi there'", "context user 'hi there'", "reply 1"]),
    ("typed text over the bot interrupts it", {}, ASK + SPEAKING + ["text:stop@2"],
     SPOKE + CUT + ["turn_started 2 s-2", "transcript 2 'stop'", "context user 'stop'", "reply 2"]),
    ("dtmf carries the turn number", {}, ["dtmf:5@0", "text:hi@0.1", "dtmf:#@0.2"],
     ["dtmf 5 0", "turn_started 1 s-1", "transcript 1 'hi'", "context user 'hi'", "reply 1", "dtmf # 1"]),
    ("reply failed", {}, ASK + ["fail@1.5"], ASKED + ["error UNAVAILABLE llm/tts", "span_end 1", "turn_ended 1 REPLY_FAILED"]),
    # -- idle
    ("idle timeout", {"lifecycle": pb.LifecycleOptions(idle_timeout_secs=10)}, ["tick@9.9", "tick@10", "tick@10.1"],
     ["idle_timeout", "close IDLE_TIMEOUT"]),
    ("a turn in progress keeps the session alive", {"lifecycle": pb.LifecycleOptions(idle_timeout_secs=10)},
     ["start@1", "tick@12", "stop@13", "tick@20", "final:x@20.1", "eou@20.1", "done@21", "tick@29.9", "tick@30"],
     STOPPED + ["turn_delayed 1", "transcript 1 'x'", "context user 'x'", "reply 1", "span_end 1", "turn_ended 1 ANSWERED",
                "idle_timeout", "close IDLE_TIMEOUT"]),
    ("user idle: re-prompts, then ends", {"lifecycle": pb.LifecycleOptions(user_idle_secs=5, user_idle_retries=1)},
     ["say:Hi@0", "done@1", "tick@5.9", "tick@6", "done@7", "tick@11.9", "tick@12"],
     ["turn_started 1 s-1", "bot_reply 1 'Hi'", "span_end 1", "turn_ended 1 ANSWERED", "turn_started 2 s-2",
      "bot_reply 2 'Are you still there?'", "span_end 2", "turn_ended 2 ANSWERED", "idle_timeout user", "close IDLE_TIMEOUT"]),
    ("user idle: the user answering resets it", {"lifecycle": pb.LifecycleOptions(user_idle_secs=5, user_idle_retries=1)},
     ["say:Hi@0", "done@1", "activity@5", "tick@6.5", "tick@20"],
     ["turn_started 1 s-1", "bot_reply 1 'Hi'", "span_end 1", "turn_ended 1 ANSWERED"]),
    ("max duration", {"lifecycle": pb.LifecycleOptions(max_duration_secs=60)}, ["tick@59", "tick@60"], ["close MAX_DURATION"]),
    # -- end and cancel
    ("end with nothing in flight closes once drained", {}, ["end@0", "end@0.1"], ["close_when_drained ENDED"]),
    ("end lets the current reply finish", {}, ASK + SPEAKING + ["end@2", "done@3"],
     SPOKE + ANSWERED + ["close_when_drained ENDED"]),
    ("end while the user speaks: the turn is still answered", {}, ["start@0", "end@0.5", "final:bye@0.7", "eou@0.7", "done@1"],
     STOPPED + ["transcript 1 'bye'", "context user 'bye'", "reply 1", "span_end 1", "turn_ended 1 ANSWERED",
                "close_when_drained ENDED"]),
    ("end while speech over the bot waits for min_words: that speech is still answered",
     {"interruptions": pb.InterruptionOptions(min_words=3)},
     ASK + SPEAKING + ["start@2", "stop@2.5", "end@2.7", "done@3", "final#s-2.1:wait@3.2", "eou#s-2.1@3.2", "done@4"],
     SPOKE + ["turn_context s-2.1", "finalize s-2.1"] + ANSWERED
     + ["turn_started 2 s-2.1", "user_started 2", "transcript 2 'wait'", "context user 'wait'", "reply 2", "span_end 2",
        "turn_ended 2 ANSWERED", "close_when_drained ENDED"]),
    ("end waits 30 s at most", {"turn": pb.TurnOptions(final_transcript_give_up_secs=60)},
     ["start@0", "stop@1", "end@1.1", "wait@31.09", "wait@31.2"], STOPPED + ["turn_delayed 1", "close_when_drained ENDED"]),
    ("cancel closes at once", {}, ASK + ["cancel@1.5"], ASKED + ["close CANCELLED"]),
    ("session over: the turn in flight ends", {}, ASK + SPEAKING + ["closing@2"],
     SPOKE + ["context assistant* 'Hi there.'", "bot_stopped 1", "span_end 1", "turn_ended 1 SESSION_ENDED"]),
    ("session over: a superseded turn's span ends", {}, ["start@0", "stop@1", "start@1.5", "closing@2"],
     SUPERSEDED + ["span_end 2", "turn_ended 2 SESSION_ENDED", "span_end 1"]),
]


@pytest.mark.parametrize("name,fields,steps,expected", ROWS, ids=[row[0] for row in ROWS])
def test_turn_rule(name, fields, steps, expected):
    assert Script(config(**fields)).run(steps).story() == expected
