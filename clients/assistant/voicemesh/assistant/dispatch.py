"""From a ToolCallRequested to the text of its ToolCallResult: find the tool, check the
arguments, run it, turn any failure into an error result the model can read aloud."""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from voicemesh.assistant.schema import check_arguments, parse_arguments
from voicemesh.assistant.toolkit import Tool, ToolError, call
from voicemesh.v1 import llm_pb2

log = logging.getLogger("voicemesh.assistant")


@dataclass(frozen=True)
class Outcome:
    content: str
    is_error: bool = False


class ToolRunner:
    def __init__(self, tools: Sequence[Tool]):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ValueError(f"two tools are named {tool.name!r}: tool names must be unique")
            self.tools[tool.name] = tool

    def declarations(self) -> list[llm_pb2.Tool]:
        """The tools as SessionConfig.tools declares them to the model."""
        return [llm_pb2.Tool(name=tool.name, description=tool.description, parameters_json=json.dumps(tool.parameters))
                for tool in self.tools.values()]

    def resolve(self, name: str, arguments_json: str) -> tuple[Tool, dict[str, Any]]:
        """The tool and its checked arguments; ToolError says what is wrong with the call."""
        tool = self.tools.get(name)
        if tool is None:
            raise ToolError(f"there is no tool named {name!r}; the tools are: {', '.join(sorted(self.tools))}")
        arguments = parse_arguments(name, arguments_json)
        check_arguments(name, tool.parameters, arguments)
        return tool, arguments

    async def run(self, tool: Tool, arguments: dict[str, Any]) -> Outcome:
        """Run the tool: async ones on this loop, plain functions on a thread (a file or a
        network call then never holds up the session's audio). Never raises but for cancel."""
        try:
            if inspect.iscoroutinefunction(tool.run):
                result: Any = await call(tool, arguments)
            else:
                result = await asyncio.to_thread(tool.run, arguments)
                if inspect.isawaitable(result):
                    result = await result
        except ToolError as err:
            return Outcome(str(err) or f"{tool.name} failed", is_error=True)
        except Exception as err:  # a bug or an unexpected failure: the model still gets an answer
            log.exception("tool %s failed", tool.name)
            return Outcome(f"{tool.name} failed unexpectedly ({type(err).__name__}: {err})", is_error=True)
        return Outcome(result if isinstance(result, str) else json.dumps(result, default=str))
