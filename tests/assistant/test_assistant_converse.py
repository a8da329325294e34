"""The assistant through the real orchestrator: a tool call, its result and the follow-up
reply; confirmation (yes, with and without the model calling again, and no); barge-in and the
orchestrator's timeout during a tool call; reminders spoken with `say`; bad tool calls.

The mesh is real but for its engines: the VAD, STT and TTS services run their fake providers,
and the LLM service runs the real `openai` provider against `OpenAiSseFake` (tests/cloud/fakes),
which speaks the chat completions SSE protocol, tool-call fragments included. Each test scripts
what that "model" answers from the conversation it is sent, so which tool is called with which
arguments, and the reply that follows, are exact. Tools are the real backends (SQLite files in
the test's folder) and, for the cases that need a tool that never finishes, one defined here.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from cloud.fakes.backends import Finish, TextPart, ToolCallPart
from cloud.fakes.openai_sse import OpenAiSseFake
from support import START_S, WAIT_S, Processes, fake_env, silence, tone
from voicemesh.assistant.app import AssistantSession
from voicemesh.assistant.clock import ManualClock
from voicemesh.assistant.prompt import system_prompt
from voicemesh.assistant.registry import all_tools, make_context, reminder_store
from voicemesh.assistant.toolkit import Tool
from voicemesh.cli.mesh import ALL_SERVICES, BACKENDS, Mesh, free_ports
from voicemesh.runtime.fakes import FakeScript
from voicemesh.v1 import orchestrator_pb2 as pb

KEY = "sk-fake-assistant-test"
SPOKEN = ("delete the old receipts task", "yes")  # what the fake STT hears in a session, in order
PARIS = ZoneInfo("Europe/Paris")
START = datetime(2026, 12, 1, 9, 0, tzinfo=PARIS)


class ByConversation:
    """The fake model: `answer(messages)` returns the parts of the next round from what it is
    sent (the last message first of all), so a test reads like the conversation it scripts."""

    def __init__(self, answer):
        self.answer = answer
        self.asked: list[list[dict]] = []
        self.tools: list[list[dict]] = []

    async def chat(self, messages, tools):
        self.asked.append(messages)
        self.tools.append(tools)
        for part in self.answer(messages):
            yield part


def said(text: str):
    return [TextPart(text), Finish("stop", 10, 5)]


def calls(call_id: str, name: str, **arguments):
    return [ToolCallPart(call_id, name, json.dumps(arguments)), Finish("tool_calls", 10, 5)]


def last(messages: list[dict]) -> dict:
    return messages[-1]


@pytest.fixture(scope="module")
def llm_fake():
    with OpenAiSseFake(api_key=KEY, models=("gpt-fake",)) as server:
        yield server


@pytest.fixture(scope="module")
def mesh(llm_fake, tmp_path_factory, request):
    """Fake VAD, STT and TTS; the real `openai` LLM provider on the SSE fake; the real orchestrator.
    The fake STT hears a module's SPOKEN in order in each session, then "utterance <n>"."""
    procs = Processes(tmp_path_factory.mktemp("assistant-mesh"))
    script = FakeScript(transcripts=tuple(getattr(request.module, "SPOKEN", ())))
    env = {**fake_env(script), "VOICEMESH_LLM_OPENAI_BASE_URL": llm_fake.base_url,
           "VOICEMESH_LLM_OPENAI_MODEL": "gpt-fake", "OPENAI_API_KEY": KEY, "VOICEMESH_LLM_OPENAI_MAX_RETRIES": "0"}
    extra = {kind: ("--provider", "fake") for kind in BACKENDS} | {"llm": ("--provider", "openai")}
    try:
        yield procs.start_mesh(Mesh(ports=free_ports(ALL_SERVICES), env=env, services=ALL_SERVICES, extra_args=extra,
                                    log_dir=procs.log_dir / "mesh", ready_timeout=START_S))
    finally:
        procs.stop_all()


@pytest.fixture
def model(llm_fake):
    """Each test scripts the model; the fake's default comes back afterwards."""
    original = llm_fake.backend
    yield lambda answer: setattr(llm_fake, "backend", ByConversation(answer)) or llm_fake.backend
    llm_fake.backend = original


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def ctx(tmp_path, clock):
    return make_context(tmp_path / "data", PARIS, clock)


@contextlib.asynccontextmanager
async def assistant(mesh, tools, clock, **options):
    seen: list[pb.ConverseResponse] = []  # every event but audio, in order
    session = AssistantSession(tools, clock, system_prompt=system_prompt(tools, clock.now()),
                               on_event=lambda event: event.WhichOneof("event") != "audio" and seen.append(event), **options)
    session.seen = seen
    async with session.connect(mesh.orchestrator_address) as live:
        assert live is not None, session.to_json()
        yield session


async def wait_for(session: AssistantSession, what: str, condition, timeout: float = WAIT_S) -> None:
    """Wait on the session's events until `condition()`; the failure shows what happened."""
    if not await session.wait_for(condition, timeout):
        raise AssertionError(f"no {what} within {timeout:.0f} s; the session so far: {json.dumps(session.to_json())}")


def bot_texts(session: AssistantSession) -> list[str]:
    return [turn.bot_text for turn in session.tracker.turns.values() if turn.bot_text]


def server_errors(session: AssistantSession) -> list[str]:
    return [str(error) for error in session.tracker.result.errors]


def cancelled_events(session: AssistantSession, reason: str) -> list[str]:
    return [call_id for event in session.seen if event.WhichOneof("event") == "tool_call_cancelled"
            and event.tool_call_cancelled.reason == reason for call_id in event.tool_call_cancelled.ids]


# ---- a tool call, its result, the follow-up reply ------------------------------------------------
async def test_a_tool_call_runs_and_the_model_replies_with_its_result(mesh, model, clock, ctx):
    def answer(messages):
        if last(messages)["role"] == "tool":
            return said("I added buy milk to your tasks.")
        return calls("call_add", "tasks_add", title="buy milk")

    llm = model(answer)
    tools = all_tools(ctx, ("tasks",))
    async with assistant(mesh, tools, clock) as session:
        assert await session.text_turn("add buy milk to my tasks"), session.to_json()
    record = session.tool_calls[0]
    assert (record["name"], record["arguments"], record["status"], record["is_error"]) == (
        "tasks_add", {"title": "buy milk"}, "done", False), session.tool_calls
    assert "buy milk" in json.loads(record["result"])["added"]["title"]
    assert bot_texts(session) == ["I added buy milk to your tasks."], session.to_json()
    # The model was told of every tool, and read the tool's own result.
    declared = {tool["function"]["name"]: tool["function"] for tool in llm.tools[0]}
    assert set(declared) == {tool.name for tool in tools}
    assert declared["tasks_add"]["parameters"]["required"] == ["title"]
    assert "no web access" in llm.asked[0][0]["content"] and "Europe/Paris" in llm.asked[0][0]["content"]
    assert llm.asked[1][-1] == {"role": "tool", "tool_call_id": "call_add", "content": record["result"]}
    listed = json.loads(await _run(tools, "tasks_list"))["tasks"]
    assert [task["title"] for task in listed] == ["buy milk"]
    assert not server_errors(session)


async def _run(tools: list[Tool], name: str, **arguments) -> str:
    from voicemesh.assistant.dispatch import ToolRunner

    runner = ToolRunner(tools)
    outcome = await runner.run(*runner.resolve(name, json.dumps(arguments)))
    assert not outcome.is_error, outcome
    return outcome.content


# ---- confirmation ----------------------------------------------------------------------------
@pytest.mark.parametrize("model_calls_again", [True, False], ids=["model-calls-again", "model-only-replies"])
async def test_yes_runs_a_tool_that_needs_confirmation(mesh, model, clock, ctx, model_calls_again):
    tools = all_tools(ctx, ("tasks",))
    await _run(tools, "tasks_add", title="old receipts")

    def answer(messages):
        if last(messages)["role"] == "tool":
            return said("Deleted.")
        if last(messages)["content"] == "yes":
            return calls("call_again", "tasks_delete", id=1) if model_calls_again else said("Okay.")
        return calls("call_del", "tasks_delete", id=1)

    llm = model(answer)
    async with assistant(mesh, tools, clock) as session:
        assert await session.text_turn("delete the old receipts task"), session.to_json()
        # Not run yet: the question is spoken word for word, and the task is still there.
        assert session.announcements == ["Delete the task 'old receipts'?"], session.to_json()
        assert "Delete the task 'old receipts'?" in bot_texts(session)
        assert [task["title"] for task in json.loads(await _run(tools, "tasks_list"))["tasks"]] == ["old receipts"]
        assert await session.text_turn("yes"), session.to_json()
    first = session.tool_calls[0]
    assert first["status"] == "confirmed" and json.loads(first["result"])["deleted"]["title"] == "old receipts"
    assert json.loads(await _run(tools, "tasks_list", status="all"))["tasks"] == []
    if model_calls_again:  # the confirmed result answers the second call: the tool ran once
        assert session.tool_calls[1]["status"] == "done" and session.tool_calls[1]["result"] == first["result"]
        assert bot_texts(session)[-1] == "Deleted."
    else:  # the model only replied: the assistant says it is done
        assert len(session.tool_calls) == 1 and session.announcements[-1] == "Done."
        assert bot_texts(session)[-2:] == ["Okay.", "Done."]
    # The waiting result asked the model for nothing more (run_llm false): no reply round for it.
    waiting = [m for asked in llm.asked for m in asked if m.get("tool_call_id") == "call_del"]
    assert waiting and "waiting for the user's confirmation" in waiting[0]["content"]
    assert not any(asked[-1].get("tool_call_id") == "call_del" for asked in llm.asked), llm.asked
    assert not server_errors(session)


async def test_a_spoken_yes_runs_it_too(mesh, model, clock, ctx):
    tools = all_tools(ctx, ("tasks",))
    await _run(tools, "tasks_add", title="old receipts")

    def answer(messages):
        if last(messages)["content"] == SPOKEN[0]:
            return calls("call_del", "tasks_delete", id=1)
        return said("Okay.")

    model(answer)
    utterance = np.concatenate([silence(0.3), tone(1.0), silence(1.2)])  # loud enough to be speech to the fakes
    async with assistant(mesh, tools, clock) as session:
        await session.stream_audio(utterance)  # until the question has been asked
        assert session.announcements == ["Delete the task 'old receipts'?"], session.to_json()
        await session.stream_audio(utterance)  # "yes"
        await wait_for(session, "the outcome", lambda: session.announcements[-1] == "Done." and session.settled())
    assert session.to_json()["user_transcripts"] == list(SPOKEN)
    assert session.tool_calls[0]["status"] == "confirmed"
    assert json.loads(await _run(tools, "tasks_list", status="all"))["tasks"] == []


async def test_no_leaves_it_undone(mesh, model, clock, ctx):
    tools = all_tools(ctx, ("tasks",))
    await _run(tools, "tasks_add", title="old receipts")

    def answer(messages):
        if last(messages)["role"] == "tool":
            return said("Fine, I left it.")
        if last(messages)["content"].startswith("no"):
            return calls("call_again", "tasks_delete", id=1)  # a model that calls anyway is refused
        return calls("call_del", "tasks_delete", id=1)

    model(answer)
    async with assistant(mesh, tools, clock) as session:
        assert await session.text_turn("delete the old receipts task"), session.to_json()
        assert await session.text_turn("no, keep it"), session.to_json()
    assert [record["status"] for record in session.tool_calls] == ["declined", "declined"], session.tool_calls
    assert "the user said no" in session.tool_calls[1]["result"]
    assert [task["title"] for task in json.loads(await _run(tools, "tasks_list"))["tasks"]] == ["old receipts"]
    assert bot_texts(session)[-1] == "Fine, I left it."


# ---- barge-in and timeout during a tool call -------------------------------------------------------
def endless_tool(started: asyncio.Event, cancelled: asyncio.Event) -> Tool:
    async def run(arguments):
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    return Tool("lookup_slowly", "Look something up (slowly).", {"type": "object", "properties": {}}, run)


async def test_barge_in_cancels_the_running_tool_and_nothing_is_sent_for_it(mesh, model, clock):
    started, cancelled = asyncio.Event(), asyncio.Event()

    def answer(messages):
        if "never mind" in last(messages)["content"]:
            return said("Okay, forget it.")
        return calls("call_slow", "lookup_slowly")

    model(answer)
    async with assistant(mesh, [endless_tool(started, cancelled)], clock) as session:
        await session.send_text("look it up")
        await asyncio.wait_for(started.wait(), WAIT_S)
        assert await session.text_turn("never mind"), session.to_json()  # typing over the bot is a barge-in
        await asyncio.wait_for(cancelled.wait(), WAIT_S)
    assert cancelled_events(session, "interrupted") == ["call_slow"], session.to_json()
    assert session.tool_calls[0]["status"] == "cancelled: interrupted", session.tool_calls
    assert "result" not in session.tool_calls[0]
    assert bot_texts(session) == ["Okay, forget it."]
    assert not server_errors(session)  # an answer to a cancelled call would come back as an error


async def test_the_orchestrator_timeout_cancels_the_tool_and_the_model_explains(mesh, model, clock):
    started, cancelled = asyncio.Event(), asyncio.Event()

    def answer(messages):
        if last(messages)["role"] == "tool":
            assert "did not answer within" in last(messages)["content"], last(messages)
            return said("The lookup took too long.")
        return calls("call_slow", "lookup_slowly")

    model(answer)
    # A one-second deadline on a tool that never answers: the timeout always fires.
    async with assistant(mesh, [endless_tool(started, cancelled)], clock, tool_timeout_s=1.0) as session:
        assert await session.text_turn("look it up"), session.to_json()
        await asyncio.wait_for(cancelled.wait(), WAIT_S)
    assert cancelled_events(session, "timeout") == ["call_slow"], session.to_json()
    assert session.tool_calls[0]["status"] == "cancelled: timeout"
    assert bot_texts(session) == ["The lookup took too long."]
    assert not server_errors(session)


# ---- reminders ---------------------------------------------------------------------------------
async def test_a_reminder_set_in_the_session_is_spoken_when_it_comes_due(mesh, model, clock, ctx):
    def answer(messages):
        if last(messages)["role"] == "tool":
            return said("I will remind you at half past nine.")
        return calls("call_rem", "reminder_set", text="call mom", at="2026-12-01T09:30")

    model(answer)
    store = reminder_store(ctx)
    async with assistant(mesh, all_tools(ctx, ("reminders",)), clock, reminders=store) as session:
        assert await session.text_turn("remind me to call mom at half past nine"), session.to_json()
        assert store.next_due_at() == START.replace(minute=30)
        assert session.announcements == []
        clock.advance(timedelta(minutes=29))  # not yet
        clock.advance(timedelta(minutes=1))
        await wait_for(session, "spoken reminder", lambda: any("call mom" in text for text in bot_texts(session)))
        await wait_for(session, "settled session", session.settled)
    assert session.announcements == ["You wanted to be reminded: call mom."], session.to_json()
    assert store.pending() == [] and store.next_due_at() is None  # marked announced


async def test_reminders_missed_while_no_session_ran_are_reported_first(mesh, model, clock, ctx):
    model(lambda messages: said("Hello."))
    store = reminder_store(ctx)
    store.remind("water the plants", START - timedelta(hours=1), now=START - timedelta(hours=2))
    store.timer(60, START - timedelta(minutes=30), "tea")
    async with assistant(mesh, [], clock, reminders=store) as session:
        await wait_for(session, "missed reminders", lambda: len(bot_texts(session)) >= 1 and session.settled())
    assert session.announcements == [
        "While you were away: at 08:00, you wanted to be reminded: water the plants; at 08:31, your tea timer went off."]
    assert store.pending() == []


# ---- bad calls ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, arguments, message", [
    ("tasks_add", {"titel": "milk"}, "bad arguments for tasks_add: 'title' is required"),
    ("tasks_add", {"title": "milk", "priority": "urgent"}, "'priority' must be one of"),
    ("tasks_complete", {"id": "first"}, "'id' must be integer, not \"first\""),
])
async def test_a_bad_call_gets_an_error_result_the_model_can_explain(mesh, model, clock, ctx, name, arguments, message):
    def answer(messages):
        if last(messages)["role"] == "tool":
            return said("Sorry, that did not work.")
        return calls("call_bad", name, **arguments)

    llm = model(answer)
    async with assistant(mesh, all_tools(ctx, ("tasks",)), clock) as session:
        assert await session.text_turn("do something"), session.to_json()
    assert session.tool_calls, session.to_json()
    record = session.tool_calls[0]
    assert record["status"] == "rejected" and record["is_error"] and message in record["result"], record
    assert message in json.loads(llm.asked[-1][-1]["content"])["error"]  # an error result, as the model reads it
    assert bot_texts(session) == ["Sorry, that did not work."]
    assert json.loads(await _run(all_tools(ctx, ("tasks",)), "tasks_list"))["tasks"] == []


async def test_a_failed_call_made_again_is_told_to_change_course_then_stopped(mesh, model, clock, ctx):
    """A model that repeats a refused call: the second answer asks it to change course, the
    third stops it (run_llm false) and the assistant says the error itself."""
    def answer(messages):
        results = [m for m in messages if m["role"] == "tool"]
        return calls(f"call_{len(results)}", "tasks_add", title="milk", due="someday")  # not a date, ever

    llm = model(answer)
    async with assistant(mesh, all_tools(ctx, ("tasks",)), clock) as session:
        assert await session.text_turn("add milk for tomorrow"), session.to_json()
    errors = [json.loads(m["content"])["error"] for m in llm.asked[-1] if m["role"] == "tool"]
    assert len(errors) == 2 and len(llm.asked) == 3, llm.asked  # no round after the third result
    assert "'someday' is not a date" in errors[0] and "failed before" not in errors[0]
    assert errors[1] == errors[0] + " (This exact call failed before: change the arguments, or tell the user what went wrong.)"
    assert [record["status"] for record in session.tool_calls] == ["error"] * 3
    assert session.announcements == [f"Sorry, I could not do that: {session.tool_calls[0]['result']}"]
    assert bot_texts(session) == session.announcements
    assert not server_errors(session)


async def test_a_call_to_a_tool_never_declared_is_answered_by_the_llm_service(mesh, model, clock, ctx):
    """The LLM service answers it itself (the assistant's own check, for other LLM services, is
    in test_assistant_units.py): the assistant sees no call, the model still reads why."""
    def answer(messages):
        if last(messages)["role"] == "tool":
            return said("I cannot search the web.")
        return calls("call_web", "web_search", query="news")

    llm = model(answer)
    async with assistant(mesh, all_tools(ctx, ("tasks",)), clock) as session:
        assert await session.text_turn("what is in the news"), session.to_json()
    assert session.tool_calls == []
    assert "there is no tool named 'web_search'" in json.loads(llm.asked[-1][-1]["content"])["error"]
    assert bot_texts(session) == ["I cannot search the web."]
