"""LlamaCppLlmProvider against the real embedded Qwen2.5 GGUF, plus the tool-call parser."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
import pytest_asyncio

from voicemesh.llm.providers.base import (
    ChatTurn,
    GenerationParams,
    Queued,
    RoundEnd,
    TextDelta,
    ToolCallRequest,
    ToolSpec,
)
from voicemesh.llm.providers.llamacpp import LlamaCppLlmProvider
from voicemesh.llm.providers.toolcalls import ToolCallStreamParser, openai_messages

SYSTEM = "You are a helpful voice assistant. Answer in one short sentence."
WEATHER_TOOL = ToolSpec(
    name="get_weather",
    description="Get the current weather for a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string", "description": "City name"}},
        "required": ["city"],
    },
)
GREEDY = GenerationParams(max_tokens=128, temperature=0.0, seed=0)


def chat(*turns: tuple[str, str]) -> list[ChatTurn]:
    return [ChatTurn(role=role, content=content) for role, content in turns]


async def collect(provider, messages, tools=(), params=GREEDY):
    return [event async for event in provider.stream(messages, list(tools), params)]


DEADLINE_S = 120  # for a state llama.cpp must reach (far sooner when idle); never a speed claim


async def wait_metrics(provider, done, what: str) -> dict[str, float]:
    """Poll llama.cpp's metrics until `done(metrics)`; past the deadline, fail with the last ones."""
    deadline = time.monotonic() + DEADLINE_S
    while not done(metrics := await provider.server_metrics()):
        if time.monotonic() > deadline:
            raise AssertionError(f"llama.cpp not {what} after {DEADLINE_S} s; its metrics: {metrics}")
        await asyncio.sleep(0.01)
    return metrics


async def wait_idle(provider) -> dict[str, float]:
    """llama.cpp releases a cancelled slot on its own loop thread: poll until it has."""
    return await wait_metrics(provider, lambda metrics: metrics["requests_processing"] == 0, "idle")


async def first_of(event: asyncio.Event, task: asyncio.Task, what: str) -> None:
    """Until `event` is set; fails at once if `task` ends first (its error, if any, is raised)."""
    waiter = asyncio.ensure_future(event.wait())
    done, _ = await asyncio.wait({waiter, task}, timeout=DEADLINE_S, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not event.is_set():
        if task in done:
            task.result()  # its exception, if it failed
        raise AssertionError(f"no {what} after {DEADLINE_S} s" if not done else f"ended before {what}")


# --- real model -------------------------------------------------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider():
    llm = LlamaCppLlmProvider()
    started = time.perf_counter()
    await llm.load()
    print(f"\nload + warm-up: {time.perf_counter() - started:.2f}s")
    yield llm
    await llm.close()


@pytest.mark.models
@pytest.mark.asyncio(loop_scope="module")
async def test_info_reports_gguf(provider):
    info = provider.info()
    assert info.provider == "llamacpp"
    assert info.model.endswith(".gguf")


@pytest.mark.models
@pytest.mark.asyncio(loop_scope="module")
async def test_capital_of_france_streams_deltas(provider):
    started = time.perf_counter()
    first_delta_at = None
    events = []
    async for event in provider.stream(
        chat(("system", SYSTEM), ("user", "What is the capital of France?")), [], GREEDY
    ):
        if isinstance(event, TextDelta) and first_delta_at is None:
            first_delta_at = time.perf_counter() - started
        events.append(event)
    total = time.perf_counter() - started
    deltas = [e for e in events if isinstance(e, TextDelta)]
    end = events[-1]
    print(f"\nTTFT {first_delta_at * 1000:.0f} ms, total {total * 1000:.0f} ms, "
          f"{end.output_tokens} tokens: {''.join(d.text for d in deltas)!r}")
    assert len(deltas) >= 3
    assert "Paris" in "".join(d.text for d in deltas)
    assert [type(e) for e in events].count(RoundEnd) == 1
    assert isinstance(end, RoundEnd) and end.finish_reason == "stop"
    assert end.input_tokens > 0 and end.output_tokens > 0


@pytest.mark.models
@pytest.mark.asyncio(loop_scope="module")
async def test_long_generation_streams_and_cancel_stops_it(provider):
    before = await wait_idle(provider)
    max_tokens = 400
    first_delta = asyncio.Event()
    received: list[TextDelta] = []

    async def consume():
        messages = chat(("user", "Write a very long story about a dragon who learns to bake bread."))
        async for event in provider.stream(messages, [], GenerationParams(max_tokens=max_tokens)):
            if isinstance(event, TextDelta):
                received.append(event)
                first_delta.set()

    task = asyncio.create_task(consume())
    await first_of(first_delta, task, "first delta")
    # True streaming: the first delta is here while llama.cpp is still generating.
    assert (await provider.server_metrics())["requests_processing"] == 1
    cancelled_at = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancel_latency = time.perf_counter() - cancelled_at
    after = await wait_idle(provider)
    generated = after["tokens_predicted_total"] - before["tokens_predicted_total"]
    print(f"\ncancel: task done {cancel_latency * 1000:.0f} ms after cancel(), "
          f"{generated:.0f} tokens generated, {len(received)} deltas consumed")
    assert generated < max_tokens / 4, "generation kept going after the consumer was cancelled"

    # The provider is still usable afterwards.
    events = await collect(provider, chat(("system", SYSTEM), ("user", "What is the capital of France?")))
    assert "Paris" in "".join(e.text for e in events if isinstance(e, TextDelta))
    assert events[-1] == RoundEnd("stop", events[-1].input_tokens, events[-1].output_tokens)


@pytest.mark.models
@pytest.mark.asyncio(loop_scope="module")
async def test_closing_the_generator_stops_generation(provider):
    before = await wait_idle(provider)
    stream = provider.stream(chat(("user", "Count from 1 to 300, one number per line.")), [],
                             GenerationParams(max_tokens=400))
    assert isinstance(await anext(stream), TextDelta)
    await stream.aclose()
    after = await wait_idle(provider)
    assert after["tokens_predicted_total"] - before["tokens_predicted_total"] < 100
    events = await collect(provider, chat(("user", "Say hello.")), params=GenerationParams(max_tokens=16))
    assert isinstance(events[-1], RoundEnd) and events[-1].output_tokens > 0


@pytest.mark.models
@pytest.mark.asyncio(loop_scope="module")
async def test_cancel_during_prefill_stops_generation(provider):
    before = await wait_idle(provider)
    notes = " ".join(f"Note {i}: the parcel for room {i} arrived on time." for i in range(60))
    stream = provider.stream(chat(("user", f"{notes} Summarise these notes.")), [],
                             GenerationParams(max_tokens=200))
    first = asyncio.create_task(anext(stream))
    await wait_metrics(provider, lambda metrics: metrics["requests_processing"] > 0 or first.done(), "processing the request")
    assert not first.done(), "the request ended before it was seen processing"
    first.cancel()  # ~800 prompt tokens: llama.cpp is still in prefill here
    with pytest.raises(asyncio.CancelledError):
        await first
    cancelled_at = time.perf_counter()
    after = await wait_idle(provider)
    print(f"\nprefill cancel: llama.cpp idle {(time.perf_counter() - cancelled_at) * 1000:.0f} ms later")
    # Usually zero tokens; on a loaded machine prefill may finish just before the cancel lands,
    # so allow a few, far below the 200 a finished request would produce.
    assert after["tokens_predicted_total"] - before["tokens_predicted_total"] < 20
    events = await collect(provider, chat(("user", "Say hello.")), params=GenerationParams(max_tokens=16))
    assert isinstance(events[-1], RoundEnd) and events[-1].output_tokens > 0


@pytest.mark.models
@pytest.mark.asyncio(loop_scope="module")
async def test_a_request_waiting_for_the_slot_says_so_and_one_closed_there_gives_up_its_place(provider):
    """One slot: a second request yields Queued until the first is done, then its answer; a third,
    closed while it waits behind the second, leaves the queue and takes no slot with it."""
    assert provider.parallel == 1
    await wait_idle(provider)
    seen: list = []
    streams = []  # closed at the end whatever happens, so no slot outlives the test

    def opened(messages, params):
        streams.append(provider.stream(messages, [], params))
        return streams[-1]

    try:
        async with asyncio.timeout(DEADLINE_S):
            first = opened(chat(("user", "Count from 1 to 300, one number per line.")), GenerationParams(max_tokens=200))
            assert isinstance(await anext(first), TextDelta)  # it holds the slot
            second = opened(chat(("system", SYSTEM), ("user", "What is the capital of France?")), GREEDY)
            waiting = await anext(second)
            assert isinstance(waiting, Queued) and waiting.ahead == 0, waiting
            third = opened(chat(("user", "Say hello.")), GenerationParams(max_tokens=16))
            behind = await anext(third)
            assert isinstance(behind, Queued) and behind.ahead == 1, behind
            await third.aclose()
            await first.aclose()  # the slot goes to the second
            seen = [event async for event in second]
            assert "Paris" in "".join(e.text for e in seen if isinstance(e, TextDelta)), seen
            assert isinstance(seen[-1], RoundEnd) and seen[-1].finish_reason == "stop"
            # No slot was lost to the closed ones: two more requests run, one after the other.
            for _ in range(2):
                seen = await collect(provider, chat(("user", "Say hello.")), params=GenerationParams(max_tokens=8))
                assert isinstance(seen[-1], RoundEnd), seen
    except TimeoutError:
        raise AssertionError(f"stuck after {DEADLINE_S} s (a slot lost?); last events {seen}") from None
    finally:
        for stream in streams:
            await stream.aclose()


@pytest.mark.models
@pytest.mark.asyncio(loop_scope="module")
async def test_concurrent_requests_both_complete(provider):
    questions = ["What is the capital of France?", "What is the capital of Italy?"]
    results = await asyncio.gather(
        *(collect(provider, chat(("system", SYSTEM), ("user", q))) for q in questions)
    )
    texts = ["".join(e.text for e in events if isinstance(e, TextDelta)) for events in results]
    assert "Paris" in texts[0] and "Rome" in texts[1]
    assert all(events[-1].finish_reason == "stop" for events in results)


@pytest.mark.models
@pytest.mark.asyncio(loop_scope="module")
async def test_weather_question_yields_tool_call(provider):
    events = await collect(
        provider, chat(("system", SYSTEM), ("user", "What's the weather in Paris?")), [WEATHER_TOOL]
    )
    calls = [e for e in events if isinstance(e, ToolCallRequest)]
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert calls[0].arguments.get("city", "").lower().startswith("paris")
    assert calls[0].id.startswith("call_")
    spoken = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert "get_weather" not in spoken and "{" not in spoken
    assert isinstance(events[-1], RoundEnd) and events[-1].finish_reason == "tool_calls"


@pytest.mark.models
@pytest.mark.asyncio(loop_scope="module")
async def test_tool_result_is_used_in_the_answer(provider):
    call = ToolCallRequest(id="call_1", name="get_weather", arguments={"city": "Paris"})
    result = json.dumps({"city": "Paris", "temperature_c": 18, "conditions": "light rain"})
    messages = chat(("system", SYSTEM), ("user", "What's the weather in Paris?")) + [
        ChatTurn(role="assistant", content="", tool_calls=[call]),
        ChatTurn(role="tool", content=result, tool_call_id="call_1", name="get_weather"),
    ]
    events = await collect(provider, messages, [WEATHER_TOOL])
    answer = "".join(e.text for e in events if isinstance(e, TextDelta))
    print(f"\nanswer with tool result: {answer!r}")
    assert not any(isinstance(e, ToolCallRequest) for e in events)
    assert "rain" in answer.lower() or "18" in answer
    assert events[-1].finish_reason == "stop"


# --- parser and history rendering (no model) -------------------------------------------

def parse(chunks: list[str], tools=("get_weather",)):
    ids = iter(range(1, 100))
    parser = ToolCallStreamParser(tools, lambda: f"call_{next(ids)}")
    events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.finish()
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    return text, [e for e in events if isinstance(e, ToolCallRequest)]


def test_tagged_call_split_across_chunks_keeps_outside_text():
    text, calls = parse(["Let me check. <to", "ol_call>\n{\"name\": \"get_wea", "ther\", \"arguments\": ",
                         "{\"city\": \"Paris\"}}\n</tool", "_call>\nOne moment."])
    assert text == "Let me check. One moment."
    assert calls == [ToolCallRequest("call_1", "get_weather", {"city": "Paris"})]


def test_bare_json_call_and_repeats_are_parsed_once():
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    text, calls = parse([call[:10], call[10:], "\n" + call + "\n", call])
    assert text == ""
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_json_that_is_not_call_shaped_is_text():
    text, calls = parse(['{"city": "Paris", ', '"temp": 18}'])
    assert calls == [] and text == '{"city": "Paris", "temp": 18}'
    # Call-shaped JSON to an undeclared tool is still a call: the servicer rejects it.
    text, calls = parse(['{"name": "add", "arguments": "{\\"a\\": 2}"}'])
    assert text == "" and [(c.name, c.arguments) for c in calls] == [("add", {"a": 2})]
    # Without declared tools a JSON reply is just text.
    text, calls = parse(['{"name": "add", "arguments": {}}'], tools=())
    assert calls == [] and text == '{"name": "add", "arguments": {}}'


def test_plain_text_and_tag_lookalikes_pass_through():
    text, calls = parse(["I like <tomatoes", "> and {braces} mid-sentence."])
    assert calls == [] and text == "I like <tomatoes> and {braces} mid-sentence."
    text, calls = parse(["Hello", " there"], tools=())
    assert text == "Hello there"


def test_unterminated_or_broken_tagged_call_is_never_spoken():
    text, calls = parse(["Sure. <tool_call>{\"name\": \"get_weather\", \"argu"])
    assert text == "Sure. " and calls == []


def test_tool_history_becomes_a_user_message_with_results():
    call = ToolCallRequest("call_7", "get_weather", {"city": "Paris"})
    turns = [
        ChatTurn("system", SYSTEM),
        ChatTurn("user", "Weather in Paris?"),
        ChatTurn("assistant", "", tool_calls=[call]),
        ChatTurn("tool", '{"temperature_c": 18}', tool_call_id="call_7"),
    ]
    rendered = openai_messages(turns)
    assert [m["role"] for m in rendered] == ["system", "user", "user"]
    assert 'get_weather({"city": "Paris"}) returned: {"temperature_c": 18}' in rendered[-1]["content"]
    native = openai_messages(turns, native_tool_history=True)
    assert native[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert native[3] == {"role": "tool", "content": '{"temperature_c": 18}', "tool_call_id": "call_7"}
