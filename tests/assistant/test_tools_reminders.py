"""Reminders and timers on a real SQLite file, with a clock moved by hand: what is due when,
what was missed between sessions, when to wake next, and bad input."""
from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from assistant.backends import PARIS, UTC, make_ctx, tool
from voicemesh.assistant.toolkit import ToolError, call
from voicemesh.assistant.tools import reminders
from voicemesh.assistant.tools.reminders import Reminders


def run(tools, name, **arguments):
    return json.loads(tool(tools, name).run(arguments))


def test_a_reminder_is_due_at_its_local_time(tmp_path):
    ctx = make_ctx(tmp_path)  # 2026-12-01 10:00 Paris
    set_ = run(reminders.tools(ctx), "reminder_set", text="call mum", at="2026-12-01T18:00")["set"]
    assert set_ == {"id": 1, "kind": "reminder", "text": "call mum", "at": "2026-12-01 18:00"}
    store = Reminders(tmp_path / "reminders.sqlite3", UTC)
    assert store.next_due_at() == datetime(2026, 12, 1, 17, 0, tzinfo=UTC)  # 18:00 in Paris is 17:00 UTC
    assert store.due(datetime(2026, 12, 1, 16, 59, 59, tzinfo=UTC)) == []
    [due] = store.due(datetime(2026, 12, 1, 17, 0, tzinfo=UTC))
    assert due.text == "call mum" and due.due_at.tzinfo == UTC


def test_a_time_alone_is_its_next_occurrence(tmp_path):
    ctx = make_ctx(tmp_path)  # 10:00
    tools = reminders.tools(ctx)
    assert run(tools, "reminder_set", text="lunch", at="12:30")["set"]["at"] == "2026-12-01 12:30"
    assert run(tools, "reminder_set", text="stretch", at="9:00")["set"]["at"] == "2026-12-02 09:00"
    cancel = tool(tools, "reminder_cancel")
    assert cancel.confirm({"id": 2}) == "Cancel the reminder 'stretch' for 2026-12-02 09:00?"


def test_timers_fire_in_order_and_each_is_announced_once(tmp_path):
    ctx = make_ctx(tmp_path)
    tools = reminders.tools(ctx)
    pasta = run(tools, "timer_set", minutes=10, label="pasta")["set"]
    assert pasta["duration"] == "10 minutes" and pasta["at"] == "2026-12-01 10:10"
    eggs = run(tools, "timer_set", minutes=1, seconds=30, label="eggs")["set"]
    assert eggs["duration"] == "1 minute 30 seconds"
    store = Reminders(tmp_path / "reminders.sqlite3", PARIS)
    assert store.next_due_at() == ctx.now() + timedelta(seconds=90)

    now = ctx.now.advance(seconds=90)
    assert [item.text for item in store.due(now)] == ["eggs"]
    store.mark_announced(eggs["id"], now)
    assert store.due(now) == []
    assert store.next_due_at() == datetime(2026, 12, 1, 10, 10, tzinfo=PARIS)

    now = ctx.now.advance(minutes=20)
    assert [item.text for item in store.due(now)] == ["pasta"]
    store.mark_announced(pasta["id"], now)
    assert store.next_due_at() is None
    assert run(tools, "reminders_list") == {"pending": []}


def test_what_came_due_between_sessions_is_missed(tmp_path):
    ctx = make_ctx(tmp_path)
    tools = reminders.tools(ctx)
    run(tools, "reminder_set", text="take the bins out", at="2026-12-01T20:00")
    run(tools, "reminder_set", text="dentist", at="2026-12-02T09:00")
    store = Reminders(tmp_path / "reminders.sqlite3", PARIS)
    next_morning = datetime(2026, 12, 2, 8, 0, tzinfo=PARIS)  # the next session starts
    missed = store.missed(next_morning)
    assert [(item.text, item.due_at.hour) for item in missed] == [("take the bins out", 20)]
    store.mark_announced(missed[0].id, next_morning)
    assert store.missed(next_morning) == [] and store.next_due_at() == datetime(2026, 12, 2, 9, 0, tzinfo=PARIS)


def test_cancel_asks_first_and_then_the_reminder_never_fires(tmp_path):
    ctx = make_ctx(tmp_path)
    tools = reminders.tools(ctx)
    reminder_id = run(tools, "reminder_set", text="call mum", at="today 18:00")["set"]["id"]
    cancel = tool(tools, "reminder_cancel")
    assert cancel.confirm({"id": reminder_id}) == "Cancel the reminder 'call mum' for 18:00?"
    assert run(tools, "reminder_cancel", id=reminder_id)["cancelled"]["text"] == "call mum"
    store = Reminders(tmp_path / "reminders.sqlite3", PARIS)
    assert store.due(ctx.now.advance(days=1)) == [] and store.next_due_at() is None
    with pytest.raises(ToolError, match="reminder 1 was already cancelled"):
        cancel.run({"id": reminder_id})


async def test_bad_input_is_explained(tmp_path):
    ctx = make_ctx(tmp_path)
    tools = reminders.tools(ctx)
    for name, arguments, message in [
        ("reminder_set", {"text": "x", "at": "2026-12-01T09:00"},
         r"2026-12-01 09:00 has already passed \(it is 2026-12-01 10:00 now\)"),
        ("reminder_set", {"text": "x", "at": "soonish"}, "'soonish' is not a date and time"),
        ("reminder_set", {"at": "2026-12-01T19:00"}, "missing argument 'text'"),
        ("timer_set", {}, "a timer needs a positive number"),
        ("timer_set", {"minutes": "ten"}, "minutes must be a number, not 'ten'"),
        ("timer_set", {"hours": 200}, "at most 7 days"),
        ("reminder_cancel", {"id": 9}, "there is no reminder or timer number 9"),
    ]:
        with pytest.raises(ToolError, match=message):
            await call(tool(tools, name), arguments)
    timer_id = run(tools, "timer_set", seconds=5)["set"]["id"]
    store = Reminders(tmp_path / "reminders.sqlite3", PARIS)
    store.mark_announced(timer_id, ctx.now.advance(seconds=5))
    with pytest.raises(ToolError, match="timer 1 has already gone off"):
        tool(tools, "reminder_cancel").run({"id": timer_id})
