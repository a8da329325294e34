"""What a tool is: a name, a JSON-schema for its arguments, and a function run on the user's side.

The assistant declares every Tool to the orchestrator (Converse's ToolOptions) and runs the one the
model calls. A tool that deletes something or reaches the outside world names a `confirm`
question: the assistant speaks it and runs the tool only on a yes.
"""
from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo


class ToolError(Exception):
    """A failure the model should hear and explain (bad arguments, nothing found): its message is
    the tool's result, marked as an error."""


@dataclass(frozen=True)
class Context:
    """What every tool may use: where the user's data lives, their time zone, and the clock
    (a function, so tests can move time without sleeping)."""
    data_dir: Path
    tz: ZoneInfo
    now: Callable[[], datetime]  # aware datetime in `tz`
    settings: dict[str, str] = field(default_factory=dict)  # e.g. home_assistant_url, smtp_host


@dataclass(frozen=True)
class Tool:
    name: str  # [a-z_]+, unique across the assistant
    description: str  # for the model: when to call it
    parameters: dict[str, Any]  # JSON schema of the arguments (type "object")
    run: Callable[[dict[str, Any]], str | Awaitable[str]]  # the result the model reads (text or JSON)
    confirm: Callable[[dict[str, Any]], str] | None = None  # the yes/no question, for destructive or outward tools


async def call(tool: Tool, arguments: dict[str, Any]) -> str:
    """Run a tool whether its function is sync or async."""
    result = tool.run(arguments)
    return await result if inspect.isawaitable(result) else result
