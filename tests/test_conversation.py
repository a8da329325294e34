"""Conversation behaviour through the real Converse API, with scripted fake services:
interruption strategies, spoken-only context, tools, lifecycle timers, greeting, muting,
context control, say and metrics. Order and content are asserted, never speed."""
from __future__ import annotations

import asyncio

import numpy as np

from support import PCM16_16K, ConverseProbe, event_is, silence, tone
from voicemesh.v1 import llm_pb2, orchestrator_pb2 as pb

Speaking = pb.SpeakingEvent
WEATHER = llm_pb2.Tool(name="get_weather", description="Weather in a city",
                       parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}')


def config(**fields) -> pb.SessionConfig:
    return pb.SessionConfig(input_format=PCM16_16K, **fields)


async def _bot_speaking_long_story(probe: ConverseProbe) -> None:
    await probe.send_text("tell me a long story")
    await probe.wait_for(event_is("speaking", kind=Speaking.KIND_BOT_STARTED))


async def test_min_words_lets_short_speech_pass_and_long_speech_interrupt(fake_mesh):
    options = pb.InterruptionOptions(min_words=3)
    async with ConverseProbe(fake_mesh, config(interruptions=options)) as probe:
        await _bot_speaking_long_story(probe)
        await probe.send_audio(np.concatenate((tone(0.3), silence(1.2))))  # about one word
        assert "clear_playback" not in probe.kinds() and "turn_ended" not in probe.kinds()
        await probe.send_audio(np.concatenate((tone(1.5), silence(1.0))))  # several words
        ended = await probe.wait_for(event_is("turn_ended", turn_number=1))
        assert ended.turn_ended.interrupted
        assert "clear_playback" in probe.kinds()
        await probe.wait_for(event_is("turn_ended", turn_number=2))


async def test_interruptions_off_keeps_the_bot_talking(fake_mesh):
    async with ConverseProbe(fake_mesh, config(interruptions=pb.InterruptionOptions(allow=False))) as probe:
        await _bot_speaking_long_story(probe)
        await probe.send_audio(np.concatenate((tone(1.0), silence(1.0))))
        assert "clear_playback" not in probe.kinds()
        assert [e.turn_number for e in probe.of("turn_started")] == [1]
        await probe.cancel()


async def test_context_keeps_only_spoken_text_marked_interrupted(fake_mesh):
    async with ConverseProbe(fake_mesh) as probe:
        await _bot_speaking_long_story(probe)
        await probe.wait_for(lambda e: e.HasField("bot_text"))
        await probe.send(pb.ConverseRequest(control=pb.SessionControl(interrupt=pb.Interrupt())))
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        spoken = [t.text for t in probe.of("bot_text")]
        await probe.send_text("what did you say")
        await probe.wait_for(event_is("turn_ended", turn_number=2))
        recalled = " ".join(t.text for t in probe.of("bot_text") if t.turn_number == 2)
        assert spoken[0] in recalled and "interrupted by the user" in recalled
        assert "number 30" not in recalled  # never spoken, so never in the context


async def test_parallel_tool_calls_round_trip(fake_mesh):
    async with ConverseProbe(fake_mesh, config(tools=pb.ToolOptions(tools=[WEATHER]))) as probe:
        await probe.send_text("what is the weather in Paris and London")
        await probe.wait_for(lambda e: len([x for _, x in probe.events if x.HasField("tool_call")]) == 2)
        calls = {c.arguments_json: c.id for c in probe.of("tool_call")}
        assert set(calls) == {'{"city": "Paris"}', '{"city": "London"}'}
        # Answer in the reverse order: results still reach the LLM in call order.
        await probe.send(pb.ConverseRequest(
            tool_result=pb.ToolCallResult(tool_call_id=calls['{"city": "London"}'], content="rainy")))
        await probe.send(pb.ConverseRequest(
            tool_result=pb.ToolCallResult(tool_call_id=calls['{"city": "Paris"}'], content="sunny")))
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        assert [t.text for t in probe.of("bot_text")] == ["The tools said: sunny and rainy."]


async def test_tool_timeout_gives_the_llm_an_error_result(fake_mesh):
    tools = pb.ToolOptions(tools=[WEATHER], timeout_secs=0.5)
    async with ConverseProbe(fake_mesh, config(tools=tools)) as probe:
        await probe.send_text("weather in Tokyo")
        call = (await probe.wait_for(lambda e: e.HasField("tool_call"))).tool_call
        cancelled = await probe.wait_for(lambda e: e.HasField("tool_call_cancelled"))
        assert list(cancelled.tool_call_cancelled.ids) == [call.id] and cancelled.tool_call_cancelled.reason == "timeout"
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        assert "did not answer" in " ".join(t.text for t in probe.of("bot_text")), probe.of("bot_text")
        # A late answer is refused in-band, and the session goes on.
        await probe.send(pb.ConverseRequest(tool_result=pb.ToolCallResult(tool_call_id=call.id, content="late")))
        error = await probe.wait_for(lambda e: e.HasField("error"))
        assert not error.error.fatal and call.id in error.error.message


async def test_barge_in_cancels_pending_tool_calls(fake_mesh):
    async with ConverseProbe(fake_mesh, config(tools=pb.ToolOptions(tools=[WEATHER]))) as probe:
        await probe.send_text("weather in Paris")
        call = (await probe.wait_for(lambda e: e.HasField("tool_call"))).tool_call
        await probe.send_text("never mind")
        cancelled = await probe.wait_for(lambda e: e.HasField("tool_call_cancelled"))
        assert list(cancelled.tool_call_cancelled.ids) == [call.id] and cancelled.tool_call_cancelled.reason == "interrupted"
        await probe.wait_for(event_is("turn_ended", turn_number=2))
        assert probe.of("bot_text")[-1].text == "You said: never mind."


async def test_run_llm_false_records_the_result_without_a_reply(fake_mesh):
    async with ConverseProbe(fake_mesh, config(tools=pb.ToolOptions(tools=[WEATHER]))) as probe:
        await probe.send_text("weather in Paris")
        call = (await probe.wait_for(lambda e: e.HasField("tool_call"))).tool_call
        await probe.send(pb.ConverseRequest(tool_result=pb.ToolCallResult(tool_call_id=call.id, content="sunny", run_llm=False)))
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        assert probe.of("bot_text") == []


async def test_idle_timeout_ends_the_session_with_an_event(fake_mesh):
    async with ConverseProbe(fake_mesh, config(lifecycle=pb.LifecycleOptions(idle_timeout_secs=0.5))) as probe:
        ended = await probe.wait_for(lambda e: e.HasField("session_ended"))
        assert ended.session_ended.reason == pb.SessionEnded.REASON_IDLE_TIMEOUT
        idle = probe.of("idle_timeout")[0]
        assert not idle.user_idle and idle.idle_seconds >= 0.5


async def test_user_idle_reprompts_then_ends(fake_mesh):
    lifecycle = pb.LifecycleOptions(user_idle_secs=0.3, user_idle_retries=2, user_idle_prompt="Still there?")
    async with ConverseProbe(fake_mesh, config(lifecycle=lifecycle)) as probe:
        await probe.send_text("hello")
        ended = await probe.wait_for(lambda e: e.HasField("session_ended"))
        assert ended.session_ended.reason == pb.SessionEnded.REASON_IDLE_TIMEOUT
        assert [t.text for t in probe.of("bot_text")] == ["You said: hello.", "Still there?", "Still there?"]
        assert probe.of("idle_timeout")[0].user_idle


async def test_max_duration(fake_mesh):
    async with ConverseProbe(fake_mesh, config(lifecycle=pb.LifecycleOptions(max_duration_secs=0.5))) as probe:
        ended = await probe.wait_for(lambda e: e.HasField("session_ended"))
        assert ended.session_ended.reason == pb.SessionEnded.REASON_MAX_DURATION


async def test_greeting_with_fixed_text_and_generated(fake_mesh):
    async with ConverseProbe(fake_mesh, config(greeting=pb.Greeting(text="Hello, how can I help?"))) as probe:
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        assert probe.kinds()[:3] == ["session_started", "turn_started", "speaking:BOT_STARTED"]
        assert [t.text for t in probe.of("bot_text")] == ["Hello, how can I help?"]
    async with ConverseProbe(fake_mesh, config(greeting=pb.Greeting(generate_instruction="greet the caller"))) as probe:
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        assert [t.text for t in probe.of("bot_text")] == ["You said: greet the caller."]


async def test_mute_strategy_always_blocks_barge_in(fake_mesh):
    async with ConverseProbe(fake_mesh, config(mute_strategies=[pb.MUTE_STRATEGY_ALWAYS])) as probe:
        await _bot_speaking_long_story(probe)
        await probe.send_audio(np.concatenate((tone(1.0), silence(1.0))))
        assert "clear_playback" not in probe.kinds() and "speaking:USER_STARTED" not in probe.kinds()
        await probe.cancel()


async def test_mute_first_speech_covers_the_greeting_only(fake_mesh):
    greeting = pb.Greeting(text="Welcome. " * 8)
    async with ConverseProbe(fake_mesh, config(greeting=greeting, mute_strategies=[pb.MUTE_STRATEGY_FIRST_SPEECH])) as probe:
        await probe.wait_for(event_is("speaking", kind=Speaking.KIND_BOT_STARTED))
        await probe.send_audio(np.concatenate((tone(0.6), silence(1.0))))  # over the greeting: ignored
        assert "speaking:USER_STARTED" not in probe.kinds()
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        await probe.send_audio(np.concatenate((tone(0.6), silence(1.0))))  # after it: heard
        await probe.wait_for(event_is("turn_ended", turn_number=2))


async def test_mute_until_first_bot_turn_complete(fake_mesh):
    strategies = [pb.MUTE_STRATEGY_UNTIL_FIRST_BOT_COMPLETE]
    greeting = pb.Greeting(text="Hi there. " * 10)  # about 2 s of audio
    async with ConverseProbe(fake_mesh, config(greeting=greeting, mute_strategies=strategies)) as probe:
        await probe.send_audio(np.concatenate((tone(0.6), silence(0.2))))  # while the greeting plays
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        assert "speaking:USER_STARTED" not in probe.kinds()
        await probe.send_audio(np.concatenate((tone(0.6), silence(1.0))))  # after it: heard
        await probe.wait_for(event_is("turn_ended", turn_number=2))


async def test_mute_during_function_calls(fake_mesh):
    options = config(tools=pb.ToolOptions(tools=[WEATHER]), mute_strategies=[pb.MUTE_STRATEGY_FUNCTION_CALL])
    async with ConverseProbe(fake_mesh, options) as probe:
        await probe.send_text("weather in Paris")
        call = (await probe.wait_for(lambda e: e.HasField("tool_call"))).tool_call
        await probe.send_audio(np.concatenate((tone(0.6), silence(1.0))))  # ignored while the call runs
        assert "tool_call_cancelled" not in probe.kinds()
        await probe.send(pb.ConverseRequest(tool_result=pb.ToolCallResult(tool_call_id=call.id, content="sunny")))
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        assert probe.of("bot_text")[0].text == "The tools said: sunny."


async def test_client_mute_control(fake_mesh):
    async with ConverseProbe(fake_mesh) as probe:
        await probe.send(pb.ConverseRequest(control=pb.SessionControl(mute=pb.Mute(muted=True))))
        await probe.send_audio(np.concatenate((tone(0.6), silence(1.0))))
        assert "turn_started" not in probe.kinds()
        await probe.send(pb.ConverseRequest(control=pb.SessionControl(mute=pb.Mute(muted=False))))
        await probe.send_audio(np.concatenate((tone(0.6), silence(1.0))))
        await probe.wait_for(event_is("turn_ended", turn_number=1))


async def test_say_append_and_replace_context(fake_mesh):
    async with ConverseProbe(fake_mesh) as probe:
        await probe.send(pb.ConverseRequest(control=pb.SessionControl(say=pb.Say(text="One moment please."))))
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        assert probe.of("bot_text")[-1].text == "One moment please."
        messages = [llm_pb2.ChatMessage(role="user", content="tell me about cats")]
        await probe.send(pb.ConverseRequest(
            control=pb.SessionControl(append_context=pb.AppendContext(messages=messages, run_llm=True))))
        await probe.wait_for(event_is("turn_ended", turn_number=2))
        assert probe.of("bot_text")[-1].text == "You said: tell me about cats."
        await probe.send(pb.ConverseRequest(control=pb.SessionControl(replace_context=pb.ReplaceContext(messages=[]))))
        await probe.send_text("count messages")
        await probe.wait_for(event_is("turn_ended", turn_number=3))
        assert probe.of("bot_text")[-1].text == "I see 2 messages."  # the system prompt and this question


async def test_context_window_prunes_oldest_turns(fake_mesh):
    async with ConverseProbe(fake_mesh, config(context=pb.ContextOptions(max_messages=3))) as probe:
        for number, text in enumerate(["one", "two", "three", "count messages"], start=1):
            await probe.send_text(text)
            await probe.wait_for(event_is("turn_ended", turn_number=number))
        assert probe.of("bot_text")[-1].text == "I see 4 messages."  # the system prompt + the last 3


async def test_metrics_event_per_turn(fake_mesh):
    async with ConverseProbe(fake_mesh, config(metrics=True)) as probe:
        await probe.send_text("hello")
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        await asyncio.sleep(0)
        metrics = (await probe.wait_for(lambda e: e.HasField("metrics"))).metrics
        assert metrics.turn_number == 1 and metrics.tts_characters == len("You said: hello.")
        assert set(metrics.ttfb_ms) == {"llm", "tts"} and metrics.llm_output_tokens > 0 and metrics.processing_ms > 0


async def test_transcript_and_streamed_stereo_recording(fake_mesh):
    recording = pb.RecordingOptions(transcript=True, stream_audio=True, sample_rate_hz=16000)
    async with ConverseProbe(fake_mesh, config(recording=recording)) as probe:
        await probe.send_audio(np.concatenate((silence(0.3), tone(0.6), silence(1.0))))
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        await probe.end()
        await probe.wait_for(lambda e: e.HasField("session_ended"))
        entries = probe.of("transcript")
        assert [(e.role, e.text) for e in entries] == [("user", "utterance 1"), ("assistant", "You said: utterance 1.")]
        assert all(e.timestamp.endswith("Z") and "T" in e.timestamp for e in entries)
        # The user's entry follows what reported their turn (the reply's LLM request may go first).
        kinds = probe.kinds()
        assert kinds.index("turn_started") < kinds.index("user_transcript") < kinds.index("transcript"), kinds
        stereo = np.frombuffer(b"".join(r.chunk.data for r in probe.of("recording")), dtype="<i2").reshape(-1, 2)
        assert len(stereo) >= 1.9 * 16000  # the whole session, both channels
        loud = lambda channel: np.abs(stereo[:, channel]).max()  # noqa: E731
        assert loud(0) > 4000 and loud(1) > 4000  # the user's tone on the left, the bot's on the right
        # The user spoke before the bot: the left channel is loud first.
        first = lambda channel: int(np.argmax(np.abs(stereo[:, channel]) > 4000))  # noqa: E731
        assert first(0) < first(1)


async def test_dtmf_reaches_the_session(fake_mesh):
    async with ConverseProbe(fake_mesh) as probe:
        for digit in "4#":
            await probe.send(pb.ConverseRequest(dtmf=pb.DtmfInput(digit=digit)))
        await probe.wait_for(lambda e: len(probe.of("dtmf")) == 2)
        assert [d.digit for d in probe.of("dtmf")] == ["4", "#"]
