"""The assistant's tools: every backend in voicemesh.assistant.tools, over one Context."""
from __future__ import annotations

import importlib
from pathlib import Path
from zoneinfo import ZoneInfo

from voicemesh.assistant.clock import Clock
from voicemesh.assistant.toolkit import Context, Tool

# Each module has `tools(ctx) -> list[Tool]` (docs/assistant.md: adding a tool).
TOOL_MODULES = ("calendar", "tasks", "reminders", "notes", "home", "email")
REMINDERS_FILE = "reminders.sqlite3"  # the file tools/reminders.py keeps them in


def make_context(data_dir: Path, tz: ZoneInfo, clock: Clock, settings: dict[str, str] | None = None) -> Context:
    return Context(data_dir=Path(data_dir), tz=tz, now=clock.now, settings=dict(settings or {}))


def all_tools(ctx: Context, modules: tuple[str, ...] = TOOL_MODULES) -> list[Tool]:
    tools: list[Tool] = []
    for name in modules:
        tools.extend(importlib.import_module(f"voicemesh.assistant.tools.{name}").tools(ctx))
    return tools


def reminder_store(ctx: Context):
    """The store the reminder tools write, for the announcer to read (the same SQLite file)."""
    from voicemesh.assistant.tools.reminders import Reminders

    return Reminders(ctx.data_dir / REMINDERS_FILE, ctx.tz)
