"""The LLM provider interface: one streaming generation round per call.

The servicer owns the tool loop (emit tool calls, wait for results, call again with them
appended), so a provider maps onto one request of a streaming API (llama.cpp, an
OpenAI-compatible server, Bedrock converse_stream). Cancelling the consuming task must
stop generation.
"""
from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from voicemesh.runtime.provider import Provider


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.2
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCallRequest:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class RoundEnd:
    """Last event of a round: why it stopped and what it cost."""

    finish_reason: str  # "stop" | "length" | "tool_calls"
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class Queued:
    """The request waits for a generation slot (a provider that runs a fixed number at once):
    yielded when the wait begins and every few seconds while it lasts, so the caller can tell a
    busy provider from a hung one."""

    ahead: int  # requests waiting before this one
    waited_ms: int


LlmEvent = TextDelta | ToolCallRequest | RoundEnd | Queued


@dataclass
class ChatTurn:
    """One OpenAI-shaped chat message."""

    role: str  # system | user | assistant | tool
    content: str = ""
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    tool_call_id: str = ""
    name: str = ""


class LlmProvider(Provider):
    @abc.abstractmethod
    def stream(
        self, messages: list[ChatTurn], tools: list[ToolSpec], params: GenerationParams
    ) -> AsyncIterator[LlmEvent]:
        """Generate one round. Ends with exactly one RoundEnd."""
