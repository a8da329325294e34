"""The to-do list on a real SQLite file: ordering, due dates, completion, deletion and bad input."""
from __future__ import annotations

import json
import sqlite3
from datetime import timedelta

import pytest

from assistant.backends import make_ctx, tool
from voicemesh.assistant.toolkit import ToolError, call
from voicemesh.assistant.tools import tasks
from voicemesh.assistant.tools.tasks import SCHEMA_VERSION, Tasks


def run(tools, name, **arguments):
    return json.loads(tool(tools, name).run(arguments))


def titles(listed):
    return [task["title"] for task in listed["tasks"]]


def test_tasks_are_listed_by_priority_then_due_date(tmp_path):
    ctx = make_ctx(tmp_path)  # Tuesday 1 December 2026
    tools = tasks.tools(ctx)
    run(tools, "tasks_add", title="Water the plants", priority="low")
    run(tools, "tasks_add", title="Pay rent", priority="high", due="2026-12-05")
    run(tools, "tasks_add", title="Call the bank", due="tomorrow")
    run(tools, "tasks_add", title="File taxes", priority="high", due="2026-12-03")
    run(tools, "tasks_add", title="Book flights", due="2026-12-10")
    assert titles(run(tools, "tasks_list")) == ["File taxes", "Pay rent", "Call the bank", "Book flights", "Water the plants"]
    assert titles(run(tools, "tasks_list", due="this_week")) == ["File taxes", "Pay rent", "Call the bank"]  # by Sunday the 6th
    assert titles(run(tools, "tasks_list", due="tomorrow")) == ["Call the bank"]
    assert titles(run(tools, "tasks_list", priority="high")) == ["File taxes", "Pay rent"]
    added = run(tools, "tasks_add", title="Buy milk")["added"]
    assert added == {"id": 6, "title": "Buy milk", "priority": "normal", "done": False}


def test_complete_uncomplete_and_delete_with_confirmation(tmp_path):
    ctx = make_ctx(tmp_path)
    tools = tasks.tools(ctx)
    task_id = run(tools, "tasks_add", title="Pay rent")["added"]["id"]
    run(tools, "tasks_add", title="Call the bank")
    assert run(tools, "tasks_complete", id=task_id)["completed"]["done"] is True
    assert titles(run(tools, "tasks_list")) == ["Call the bank"]
    assert titles(run(tools, "tasks_list", status="done")) == ["Pay rent"]
    assert run(tools, "tasks_uncomplete", id=task_id)["reopened"]["done"] is False
    assert titles(run(tools, "tasks_list", status="all")) == ["Pay rent", "Call the bank"]

    delete = tool(tools, "tasks_delete")
    assert delete.confirm({"id": task_id}) == "Delete the task 'Pay rent'?"
    assert run(tools, "tasks_delete", id=task_id)["deleted"]["title"] == "Pay rent"
    assert titles(run(tools, "tasks_list", status="all")) == ["Call the bank"]
    assert delete.confirm({"id": task_id}) == f"Delete task number {task_id}?"


async def test_bad_input_is_explained(tmp_path):
    tools = tasks.tools(make_ctx(tmp_path))
    for name, arguments, message in [
        ("tasks_complete", {"id": 42}, "there is no task number 42"),
        ("tasks_delete", {"id": 42}, "there is no task number 42"),
        ("tasks_uncomplete", {"id": "seven"}, "'seven' is not a task number"),
        ("tasks_complete", {}, "missing argument 'id'"),
        ("tasks_add", {"title": "x", "priority": "urgent"}, "unknown priority 'urgent'"),
        ("tasks_add", {"title": "x", "due": "someday"}, "'someday' is not a date"),
        ("tasks_add", {"title": "  "}, "missing argument 'title'"),
        ("tasks_list", {"status": "pending"}, "unknown status 'pending'"),
    ]:
        with pytest.raises(ToolError, match=message):
            await call(tool(tools, name), arguments)


def test_the_schema_is_versioned_and_a_newer_file_refused(tmp_path):
    store = Tasks(tmp_path / "tasks.sqlite3")
    store.add("Pay rent")
    with sqlite3.connect(tmp_path / "tasks.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ToolError, match="written by a newer version"):
        store.list()


def test_a_due_date_with_a_time_keeps_the_day(tmp_path):
    """Models often write a due date as 'tomorrow 15:00': the task is due that day."""
    ctx = make_ctx(tmp_path)
    tools = tasks.tools(ctx)
    tomorrow = (ctx.now().astimezone(ctx.tz).date() + timedelta(days=1)).isoformat()
    assert run(tools, "tasks_add", title="Buy milk", due="tomorrow 15:00")["added"]["due"] == tomorrow
    assert run(tools, "tasks_add", title="Call Ann", due=f"{tomorrow}T09:30")["added"]["due"] == tomorrow
