"""The assistant's pieces in-process: argument checks, the tool runner, yes/no, the reminder
announcer on a clock the test moves, the prompt and the command's bad input."""
from __future__ import annotations

import asyncio
import json
import threading
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from support import WAIT_S
from voicemesh.assistant import cli
from voicemesh.assistant.announcer import Announcer, announcement
from voicemesh.assistant.clock import ManualClock
from voicemesh.assistant.confirm import yes_or_no
from voicemesh.assistant.dispatch import ToolRunner
from voicemesh.assistant.prompt import system_prompt
from voicemesh.assistant.registry import TOOL_MODULES, all_tools, make_context, reminder_store
from voicemesh.assistant.schema import check_arguments, parse_arguments
from voicemesh.assistant.toolkit import Tool, ToolError

PARIS = ZoneInfo("Europe/Paris")
START = datetime(2026, 12, 1, 9, 0, tzinfo=PARIS)
NOTE = {"type": "object", "required": ["title"], "additionalProperties": False, "properties": {
    "title": {"type": "string"}, "count": {"type": "integer"}, "level": {"type": "number"}, "loud": {"type": "boolean"},
    "kind": {"type": "string", "enum": ["a", "b"]}}}


# ---- arguments -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ('{"title": "x"', "the arguments of note are not valid JSON"),
    ("[1, 2]", "must be a JSON object, not list"),
    ('"hello"', "must be a JSON object, not str"),
])
def test_arguments_that_are_not_a_json_object_say_so(text, message):
    with pytest.raises(ToolError, match=message):
        parse_arguments("note", text)


def test_no_arguments_at_all_is_an_empty_object():
    assert parse_arguments("note", "") == {} and parse_arguments("note", "  ") == {}


@pytest.mark.parametrize("arguments, message", [
    ({}, "'title' is required"),
    ({"title": 3}, "'title' must be string, not 3"),
    ({"title": "x", "count": 1.5}, "'count' must be integer, not 1.5"),
    ({"title": "x", "count": True}, "'count' must be integer, not true"),
    ({"title": "x", "level": "high"}, "'level' must be number, not \"high\""),
    ({"title": "x", "kind": "c"}, "'kind' must be one of \"a\", \"b\", not \"c\""),
    ({"title": "x", "colour": "red"}, "'colour' is not an argument of note (it takes title, count, level, loud, kind)"),
])
def test_arguments_that_do_not_fit_the_schema_name_the_argument(arguments, message):
    with pytest.raises(ToolError) as caught:
        check_arguments("note", NOTE, arguments)
    assert str(caught.value).startswith("bad arguments for note: ") and message in str(caught.value)


def test_arguments_that_fit_pass():
    check_arguments("note", NOTE, {"title": "x", "count": 2.0, "level": 3, "loud": False, "kind": "a"})
    check_arguments("free", {"type": "object", "properties": {}}, {"extra": 1})  # extras allowed unless forbidden


# ---- the runner --------------------------------------------------------------------------------
async def test_the_runner_turns_every_failure_into_an_error_result():
    seen_threads = []

    def sync_tool(arguments):
        seen_threads.append(threading.current_thread())
        return {"ok": arguments["title"]}  # not text: sent as JSON

    def refusing(arguments):
        raise ToolError("nothing is called that")

    async def broken(arguments):
        raise KeyError("oops")

    runner = ToolRunner([Tool("note", "", NOTE, sync_tool), Tool("refuse", "", {"type": "object"}, refusing),
                         Tool("broken", "", {"type": "object"}, broken)])
    outcome = await runner.run(*runner.resolve("note", '{"title": "milk"}'))
    assert (outcome.content, outcome.is_error) == ('{"ok": "milk"}', False)
    assert seen_threads and seen_threads[0] is not threading.main_thread()  # plain functions run on a thread
    assert await runner.run(*runner.resolve("refuse", "{}")) == type(outcome)("nothing is called that", True)
    failed = await runner.run(*runner.resolve("broken", "{}"))
    assert failed.is_error and "broken failed unexpectedly (KeyError" in failed.content
    with pytest.raises(ToolError, match="there is no tool named 'web_search'; the tools are: broken, note, refuse"):
        runner.resolve("web_search", "{}")


def test_tool_names_must_be_unique():
    tool = Tool("note", "", NOTE, lambda arguments: "")
    with pytest.raises(ValueError, match="two tools are named 'note'"):
        ToolRunner([tool, tool])


def test_every_backend_tool_is_declared_once_with_an_object_schema(tmp_path):
    ctx = make_context(tmp_path, PARIS, ManualClock(START))
    declared = ToolRunner(all_tools(ctx)).declarations()  # raises on a duplicate name
    assert len(declared) >= len(TOOL_MODULES)
    for tool in declared:
        assert json.loads(tool.parameters_json)["type"] == "object" and tool.description, tool


# ---- yes or no --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, answer", [
    ("yes", "yes"), ("Yes, please.", "yes"), ("Yeah go ahead", "yes"), ("sure", "yes"), ("OK.", "yes"),
    ("no", "no"), ("No, keep it.", "no"), ("don't", "no"), ("Don’t do that", "no"), ("I'm not sure", "no"),
    ("cancel that", "no"), ("what time is it", None), ("", None), ("add eggs to my list", None),
])
def test_yes_or_no_reads_the_first_words(text, answer):
    assert yes_or_no(text) == answer


# ---- reminders ----------------------------------------------------------------------------------
async def test_the_announcer_speaks_each_reminder_when_the_clock_reaches_it(tmp_path):
    clock = ManualClock(START)
    store = reminder_store(make_context(tmp_path, PARIS, clock))
    spoken: list[str] = []
    said = asyncio.Event()

    async def say(text: str) -> bool:
        spoken.append(text)
        said.set()
        return True

    announcer = Announcer(store, clock, say)
    task = asyncio.create_task(announcer.run())
    try:
        store.remind("stretch", START + timedelta(minutes=10), START)
        announcer.changed()  # a tool ran: the announcer looks again and waits for 09:10
        clock.advance(timedelta(minutes=9))
        clock.advance(timedelta(minutes=1))
        await asyncio.wait_for(said.wait(), WAIT_S)
        assert spoken == ["You wanted to be reminded: stretch."]
        await asyncio.wait_for(clock.waited(), WAIT_S)  # marked, and waiting for the next
        assert store.pending() == []
        said.clear()
        store.timer(30, clock.now(), "eggs")
        announcer.changed()
        clock.advance(timedelta(seconds=30))
        await asyncio.wait_for(said.wait(), WAIT_S)
        assert spoken[-1] == "Your eggs timer is done."
        await asyncio.wait_for(clock.waited(), WAIT_S)
        assert store.pending() == [] and store.next_due_at() is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_announcements_read_well():
    class R:
        def __init__(self, text, kind, hour, minute):
            self.id, self.text, self.kind, self.due_at = 1, text, kind, START.replace(hour=hour, minute=minute)

    assert announcement([R("timer", "timer", 9, 5)]) == "Your timer is done."
    assert announcement([R("call mom", "reminder", 9, 0), R("pasta", "timer", 9, 0)]) == (
        "You wanted to be reminded: call mom; your pasta timer is done.")
    assert announcement([R("call mom", "reminder", 8, 15)], missed=True) == (
        "While you were away: at 08:15, you wanted to be reminded: call mom.")


# ---- the prompt and the command ------------------------------------------------------------------
def test_the_prompt_gives_the_date_the_zone_the_tools_and_no_web():
    prompt = system_prompt([Tool("tasks_add", "", NOTE, lambda a: "")], START)
    assert "Tuesday 2026-12-01, 09:00" in prompt and "(Europe/Paris)" in prompt
    assert "tasks_add" in prompt and "no web access" in prompt


def test_the_default_data_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert cli.default_data_dir() == tmp_path / "voicemesh" / "assistant"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli.default_data_dir() == tmp_path / ".local" / "share" / "voicemesh" / "assistant"


@pytest.mark.parametrize("flags, message", [
    (["--tz", "Mars/Olympus"], "unknown time zone 'Mars/Olympus': use an IANA name"),
    (["--json"], "--json goes with --wav"),
    (["--wav", "/nonexistent/request.wav"], "error: "),
    (["--smtp-password-file", "/nonexistent/secret"], "cannot read --smtp-password-file /nonexistent/secret"),
])
def test_bad_flags_exit_2_saying_what_to_fix(tmp_path, capsys, flags, message):
    args = cli.build_parser().parse_args(["--data", str(tmp_path), "--addr", "127.0.0.1:1", *flags])
    assert cli.run(args, read_line=None) == 2
    assert message in capsys.readouterr().err


def test_secrets_come_from_files_and_settings_from_flags(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    args = cli.build_parser().parse_args(["--home-assistant-url", "http://127.0.0.1:8123", "--home-assistant-token-file",
                                          str(secret), "--smtp-host", "127.0.0.1", "--smtp-starttls"])
    assert cli.settings_from(args) == {"home_assistant_url": "http://127.0.0.1:8123", "home_assistant_token": "s3cret",
                                       "smtp_host": "127.0.0.1", "smtp_starttls": "true"}
