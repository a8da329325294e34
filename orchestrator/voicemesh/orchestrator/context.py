"""The LLM context of one session: the system prompt plus the turns, as the bot really had them.

- The bot's messages hold only what was spoken (per TTS segment), and an interrupted reply
  is marked as such, so the LLM knows the user did not hear the rest.
- A tool call in progress has a placeholder result until the client answers.
- A window limit drops the oldest turns, never the system prompt, and never splits a tool
  call from its results.
"""
from __future__ import annotations

from voicemesh.runtime.errors import InvalidInput
from voicemesh.v1 import llm_pb2

INTERRUPTED_MARK = " [interrupted by the user]"
TOOL_IN_PROGRESS = '{"status": "IN_PROGRESS"}'
ROLES = {"system", "user", "assistant", "tool"}


class ConversationContext:
    def __init__(self, system_prompt: str, max_messages: int = 0):
        self.messages: list[llm_pb2.ChatMessage] = [llm_pb2.ChatMessage(role="system", content=system_prompt)]
        self.max_messages = max_messages

    def snapshot(self, *extra: llm_pb2.ChatMessage) -> list[llm_pb2.ChatMessage]:
        """The messages to send to the LLM now (pruned), plus `extra` ones not yet kept."""
        self._prune()
        return [*self.messages, *extra]

    def add_user(self, text: str) -> None:
        self.messages.append(llm_pb2.ChatMessage(role="user", content=text))

    def add_assistant(self, spoken: str, interrupted: bool = False) -> None:
        if spoken or interrupted:
            content = spoken + (INTERRUPTED_MARK if interrupted else "")
            self.messages.append(llm_pb2.ChatMessage(role="assistant", content=content))

    def add_tool_calls(self, calls: list[llm_pb2.ToolCall], text: str = "") -> None:
        """The assistant asked for tools: record the calls with an IN_PROGRESS result each."""
        self.messages.append(llm_pb2.ChatMessage(role="assistant", content=text, tool_calls=calls))
        for call in calls:
            self.messages.append(llm_pb2.ChatMessage(role="tool", content=TOOL_IN_PROGRESS, tool_call_id=call.id, name=call.name))

    def set_tool_result(self, call_id: str, content: str) -> None:
        for message in reversed(self.messages):
            if message.role == "tool" and message.tool_call_id == call_id:
                message.content = content
                return

    def append(self, messages: list[llm_pb2.ChatMessage]) -> None:
        self.messages.extend(_checked(messages))

    def replace(self, messages: list[llm_pb2.ChatMessage]) -> None:
        """New context; the system prompt stays unless the new messages bring their own."""
        messages = _checked(messages)
        system = [] if any(m.role == "system" for m in messages) else [self.messages[0]]
        self.messages = [*system, *messages]

    def _prune(self) -> None:
        if not self.max_messages:
            return
        head = 1 if self.messages and self.messages[0].role == "system" else 0
        while len(self.messages) - head > self.max_messages:
            del self.messages[head]
            while len(self.messages) > head and self.messages[head].role == "tool":
                del self.messages[head]  # results without their call would confuse the model


def _checked(messages) -> list[llm_pb2.ChatMessage]:
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidInput(f"Converse: context message {index} has role {message.role!r}; use one of {sorted(ROLES)}")
    return [llm_pb2.ChatMessage().__class__.FromString(m.SerializeToString()) for m in messages]
