"""Every tool as the assistant declares it: unique names the orchestrator accepts, object schemas
whose required arguments exist, and a confirm question on each tool that deletes or sends."""
from __future__ import annotations

import re
from datetime import date, datetime, time

import pytest

from assistant.backends import PARIS, make_ctx
from voicemesh.assistant.toolkit import ToolError
from voicemesh.assistant.tools import calendar, email, home, notes, reminders, tasks
from voicemesh.assistant.tools.when import parse_date, parse_datetime, parse_time

MODULES = (calendar, tasks, reminders, notes, home, email)
ASKS_FIRST = {"calendar_cancel_event", "tasks_delete", "reminder_cancel", "email_send"}


def test_every_tool_is_declared_well(tmp_path):
    tools = [tool for module in MODULES for tool in module.tools(make_ctx(tmp_path))]
    names = [tool.name for tool in tools]
    assert len(names) == len(set(names)) == 24
    for tool in tools:
        assert re.fullmatch(r"[a-z_]+", tool.name), tool.name
        assert tool.description and tool.parameters["type"] == "object"
        assert set(tool.parameters.get("required", [])) <= set(tool.parameters["properties"]), tool.name
    assert {tool.name for tool in tools if tool.confirm is not None} == ASKS_FIRST
    assert list(tmp_path.iterdir()) == []  # building the tools touches no file


def test_spoken_dates_and_times_are_read_relative_to_the_clock():
    tuesday = date(2026, 12, 1)
    assert parse_date("today", tuesday) == tuesday
    assert parse_date("Tomorrow", tuesday) == date(2026, 12, 2)
    assert parse_date("friday", tuesday) == date(2026, 12, 4)
    assert parse_date("tuesday", tuesday) == tuesday
    assert parse_date("next tuesday", tuesday) == date(2026, 12, 8)
    assert parse_time("9am") == time(9) and parse_time("3:15 pm") == time(15, 15) and parse_time("12am") == time(0)
    now = datetime(2026, 12, 1, 10, 0, tzinfo=PARIS)
    assert parse_datetime("tomorrow at 9:30", PARIS, now) == datetime(2026, 12, 2, 9, 30, tzinfo=PARIS)
    assert parse_datetime("2026-12-02T15:00Z", PARIS, now) == datetime(2026, 12, 2, 16, 0, tzinfo=PARIS)
    for bad in ("", "noon-ish", "2026-13-01T10:00", "tomorrow 25:00"):
        with pytest.raises(ToolError):
            parse_datetime(bad, PARIS, now)
