"""A scripted LLM provider (see voicemesh.runtime.fakes for the script). The servicer runs the
tool loop: this provider asks for get_weather in one round and answers from the results the
servicer appends in the next, like a model would."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from voicemesh.llm.providers.base import (
    ChatTurn, GenerationParams, LlmEvent, LlmProvider, Queued, RoundEnd, TextDelta, ToolCallRequest, ToolSpec,
)
from voicemesh.runtime.fakes import FakeScript
from voicemesh.runtime.provider import ProviderInfo

CITIES = ("Paris", "London", "Tokyo")


def reply_to(messages: list[ChatTurn], fixed: str = "") -> str:
    """The scripted answer to a conversation whose last turn is the user's."""
    if fixed:
        return fixed
    users = [m.content for m in messages if m.role == "user"]
    user = users[-1] if users else "nothing"
    assistant = [m.content for m in messages if m.role == "assistant"]
    if "what did you say" in user:
        return f"Before, I said: {assistant[-1] if assistant else 'nothing'}"
    if "count messages" in user:
        return f"I see {len(messages)} messages."
    if "say nothing" in user:
        return ""  # a model that ends its reply at once: the orchestrator must say so
    if "only emoji" in user:
        return "🎉 **👍**"  # nothing the TTS can voice: the same as saying nothing
    if "long story" in user:
        return " ".join(f"This is sentence number {n} of a long story." for n in range(1, 31))
    return f"You said: {user}."


class FakeLlmProvider(LlmProvider):
    name = "fake"

    def __init__(self, script: FakeScript | None = None):
        self.script = script or FakeScript.load()
        self.calls = self.cancelled = 0

    async def load(self) -> None:
        pass

    async def stream(self, messages: list[ChatTurn], tools: list[ToolSpec], params: GenerationParams) -> AsyncIterator[LlmEvent]:
        self.calls += 1
        async with contextlib.aclosing(self._queued()) as waits:
            async for waiting in waits:
                yield waiting
        if messages and messages[-1].role == "tool":  # the second round of a tool call
            results = []
            for message in reversed(messages):
                if message.role != "tool":
                    break
                results.insert(0, message.content)
            reply = f"The tools said: {' and '.join(results)}."
        else:
            users = [m.content for m in messages if m.role == "user"]
            cities = [city for city in CITIES if users and city in users[-1]]
            if tools and cities and "weather" in users[-1]:
                for number, city in enumerate(cities):
                    yield ToolCallRequest(id=f"call_{number}", name="get_weather", arguments={"city": city})
                yield RoundEnd("tool_calls", input_tokens=len(messages))
                return
            reply = reply_to(messages, self.script.reply)
        words = reply.split(" ")
        first = self.script.llm_first_delta_words
        deltas = [" ".join(words[:first]), *words[first:]]
        try:
            for index, delta in enumerate(deltas):
                await asyncio.sleep((self.script.llm_token_ms if index else self.script.llm_first_token_ms) / 1000)
                yield TextDelta(delta + " ")
            yield RoundEnd("stop", input_tokens=len(messages), output_tokens=len(words))
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    async def _queued(self) -> AsyncIterator[Queued]:
        """The script's slot wait: Queued at once and every llm_queued_every_ms until it is over."""
        waited, total = 0.0, self.script.llm_queued_ms
        while waited < total:
            yield Queued(ahead=0, waited_ms=round(waited))
            step = min(max(1.0, self.script.llm_queued_every_ms), total - waited)
            await asyncio.sleep(step / 1000)
            waited += step

    def info(self) -> ProviderInfo:
        details = {"llm_calls": str(self.calls), "llm_cancelled": str(self.cancelled), **self.script.details}
        return ProviderInfo(provider="fake", model="scripted", details=details)
