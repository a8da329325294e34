"""Confirmation of the tools that delete something or reach the outside world.

The design, and why: a call to a tool with `confirm` is not run. It is answered at once with
a result that says it waits for the user (run_llm false, so the model adds nothing), and once
that turn has ended the assistant speaks the tool's own question with Converse `say`. The
next thing the user says (or types) is read here, by the assistant, not by the model: a yes
runs the tool, a no drops it, anything else drops it too (the user moved on).

- The question is spoken word for word: a small model asked to "ask the user" may paraphrase
  it, or claim the thing is done.
- The decision does not depend on the model: whether or not it calls the tool again after the
  user's "yes", the tool runs exactly once (a call again with the same arguments gets the
  confirmed result; without one, the assistant says the outcome itself).
- The question waits for the end of the turn because a `say` opens a bot turn, which would cut
  off the turn still in flight.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

from voicemesh.assistant.toolkit import Tool

YES = {"yes", "yeah", "yep", "yup", "sure", "ok", "okay", "confirm", "confirmed", "correct", "right", "affirmative",
       "absolutely", "definitely", "please", "go", "do"}
NO = {"no", "nope", "nah", "don't", "dont", "cancel", "stop", "not", "never", "negative", "wait", "abort"}
_WORD = re.compile(r"[a-z']+")


def yes_or_no(text: str) -> str | None:
    """"yes", "no" or None (neither) for the user's answer to a yes/no question: its first
    words decide ("No, keep it" is a no, "Yes please" a yes, "what time is it" neither)."""
    words = _WORD.findall(text.lower().replace("’", "'"))[:3]
    if any(word in NO for word in words):
        return "no"
    if any(word in YES for word in words):
        return "yes"
    return None


@dataclass
class Pending:
    """A call waiting for the user's yes or no."""
    tool: Tool
    arguments: dict[str, Any]
    question: str
    asked_in_turn: int  # the turn whose reply made the call; the question follows its end
    asked: bool = False  # the question has been sent (`say`)
    answer: str | None = None  # "yes" / "no" once the user answered
    answer_turn: int = 0
    outcome: asyncio.Task | None = field(default=None, repr=False)  # the run, started on "yes"
    reported: bool = False  # the outcome reached the model (a call again) or was spoken
    record: dict[str, Any] = field(default_factory=dict, repr=False)  # the call's record (AssistantSession.tool_calls)

    def matches(self, name: str, arguments: dict[str, Any]) -> bool:
        return name == self.tool.name and arguments == self.arguments
