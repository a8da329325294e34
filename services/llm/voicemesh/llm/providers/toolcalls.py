"""Qwen2.5-style tool calls: rendering the history in, parsing streamed calls out.

Qwen2.5's chat template puts the tool schemas in the system prompt and asks for
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. llama.cpp's own parser never
returned native `tool_calls` for the small Qwen GGUFs because the 0.5B model drops the
tags (they are control tokens) and answers with the bare JSON object. So the provider
parses the streamed content itself and accepts both forms.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from voicemesh.llm.providers.base import ChatTurn, TextDelta, ToolCallRequest, ToolSpec

log = logging.getLogger(__name__)

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"

ParsedEvent = TextDelta | ToolCallRequest


def openai_tools(tools: Iterable[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def _call_signature(call: ToolCallRequest) -> str:
    return f"{call.name}({json.dumps(call.arguments, ensure_ascii=False)})"


def openai_messages(turns: list[ChatTurn], native_tool_history: bool = False) -> list[dict[str, Any]]:
    """ChatTurns as OpenAI chat messages for llama.cpp's chat template.

    native_tool_history=True sends assistant tool_calls and tool messages as they are, so
    the template renders them as <tool_call>/<tool_response> blocks. The 0.5B model then
    re-emits the same call instead of answering (8 of 8 tries), so by default a run of tool
    results becomes one user message that names each call and its result, which the model
    answers in plain words (9 of 9 tries). Assistant text next to the calls is kept.
    """
    if native_tool_history:
        return [_native_message(turn) for turn in turns]
    messages: list[dict[str, Any]] = []
    calls_by_id: dict[str, ToolCallRequest] = {}
    pending_results: list[str] = []

    def flush_results() -> None:
        if pending_results:
            lines = "\n".join(pending_results)
            messages.append({
                "role": "user",
                "content": f"Results of the tools you called:\n{lines}\n"
                "Using these results, answer my last question.",
            })
            pending_results.clear()

    for turn in turns:
        if turn.role == "tool":
            call = calls_by_id.get(turn.tool_call_id)
            label = _call_signature(call) if call else (turn.name or turn.tool_call_id or "tool")
            pending_results.append(f"- {label} returned: {turn.content}")
            continue
        flush_results()
        if turn.role == "assistant" and turn.tool_calls:
            calls_by_id.update({call.id: call for call in turn.tool_calls})
            if turn.content:
                messages.append({"role": "assistant", "content": turn.content})
            continue
        messages.append({"role": turn.role, "content": turn.content})
    flush_results()
    return messages


def _native_message(turn: ChatTurn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": turn.role, "content": turn.content}
    if turn.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for call in turn.tool_calls
        ]
    if turn.role == "tool":
        message["tool_call_id"] = turn.tool_call_id
        if turn.name:
            message["name"] = turn.name
    return message


def _longest_tag_prefix_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that could be the start of tag."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ToolCallStreamParser:
    """Splits streamed content into text deltas and tool calls.

    Text inside <tool_call>...</tool_call> never comes out as text. When tools are declared,
    a bare JSON object {"name": "...", "arguments": {...}} at the start of the reply (or
    right after another call) is a call too, even to an undeclared tool (the servicer
    answers those with an error, which beats speaking JSON); other JSON is given back as
    text at the end. A call repeated verbatim in one round is dropped (the model loops).
    """

    def __init__(self, tool_names: Iterable[str], new_call_id: Callable[[], str]) -> None:
        self._tool_names = set(tool_names)
        self._new_call_id = new_call_id
        self._buffer = ""
        self._in_tag = False
        self._at_segment_start = True  # no text emitted since the start or the last call
        self._seen: set[str] = set()
        self.calls: list[ToolCallRequest] = []

    def feed(self, text: str) -> list[ParsedEvent]:
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[ParsedEvent]:
        return self._drain(final=True)

    def native_call(self, name: str, arguments_json: str) -> list[ParsedEvent]:
        """A call llama.cpp parsed itself (OpenAI delta.tool_calls), deduplicated the same way."""
        events: list[ParsedEvent] = []
        self._add_call(self._parse_obj({"name": name, "arguments": arguments_json or "{}"}), events)
        return events

    def _drain(self, final: bool) -> list[ParsedEvent]:
        events: list[ParsedEvent] = []
        while self._buffer:
            if self._in_tag:
                end = self._buffer.find(CLOSE_TAG)
                if end < 0:
                    if final:  # unterminated: parse what there is, never speak it
                        self._add_call(self._parse_call(self._buffer), events)
                        self._buffer = ""
                    break
                self._add_call(self._parse_call(self._buffer[:end]), events)
                self._buffer = self._buffer[end + len(CLOSE_TAG):]
                self._in_tag = False
                continue
            start = self._buffer.find(OPEN_TAG)
            if start >= 0:
                self._emit_text(self._buffer[:start], events)
                self._buffer = self._buffer[start + len(OPEN_TAG):]
                self._in_tag = True
                continue
            if self._at_segment_start and self._tool_names:
                stripped = self._buffer.lstrip()
                if not stripped or (not final and OPEN_TAG.startswith(stripped)):
                    if final:
                        self._buffer = ""
                    break  # only whitespace or a possible tag start so far
                if stripped.startswith("{"):
                    if not self._take_bare_call(stripped, events, final):
                        break  # the object is not complete yet
                    continue
            keep = 0 if final else _longest_tag_prefix_suffix(self._buffer, OPEN_TAG)
            self._emit_text(self._buffer[: len(self._buffer) - keep], events)
            self._buffer = self._buffer[len(self._buffer) - keep:]
            break
        return events

    def _take_bare_call(self, stripped: str, events: list[ParsedEvent], final: bool) -> bool:
        """Consume one bare JSON call from the buffer; False means wait for more text."""
        try:
            obj, end = json.JSONDecoder().raw_decode(stripped)
        except json.JSONDecodeError:
            if not final:
                return False
            obj, end = None, 0
        parsed = self._parse_obj(obj)
        if parsed is None:
            self._emit_text(self._buffer, events)  # JSON the user asked for, say it as is
            self._buffer = ""
            return True
        self._add_call(parsed, events)
        self._buffer = stripped[end:]
        return True

    def _emit_text(self, text: str, events: list[ParsedEvent]) -> None:
        if not text:
            return
        if self._at_segment_start and self.calls:
            text = text.lstrip()  # the newline between a call and following text
            if not text:
                return
        events.append(TextDelta(text))
        self._at_segment_start = False

    def _add_call(self, parsed: tuple[str, dict[str, Any]] | None, events: list[ParsedEvent]) -> None:
        self._at_segment_start = True
        if parsed is None:
            return
        name, arguments = parsed
        signature = f"{name}({json.dumps(arguments, sort_keys=True)})"
        if signature in self._seen:
            log.debug("dropping repeated tool call %s", signature)
            return
        self._seen.add(signature)
        call = ToolCallRequest(id=self._new_call_id(), name=name, arguments=arguments)
        self.calls.append(call)
        events.append(call)

    def _parse_call(self, body: str) -> tuple[str, dict[str, Any]] | None:
        try:
            return self._parse_obj(json.loads(body.strip()))
        except json.JSONDecodeError:
            log.warning("unparseable tool call dropped: %r", body[:200])
            return None

    @staticmethod
    def _parse_obj(obj: Any) -> tuple[str, dict[str, Any]] | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(arguments, str):  # some models send OpenAI's JSON-string form
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        return obj["name"], arguments
