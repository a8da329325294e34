"""Function calling across the Converse stream: the LLM asks, the client runs the tool.

Each call becomes a ToolCallRequested event; the client answers with a ToolCallResult. All
calls of a round run in parallel, each with its own timeout (a late call gets an error
result, so the LLM can still answer). Barge-in cancels whatever is pending.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from voicemesh.orchestrator import events
from voicemesh.v1 import llm_pb2, orchestrator_pb2 as pb


class ToolBroker:
    def __init__(self, emit: Callable[[pb.ConverseResponse], None], timeout_s: float,
                 on_change: Callable[[bool], None] = lambda in_progress: None):
        """`on_change(in_progress)`: a call started or finished (mute strategies watch it)."""
        self.emit = emit
        self.timeout_s = timeout_s
        self.pending: dict[str, asyncio.Future] = {}
        self._on_change = on_change

    def on_change(self) -> None:
        self._on_change(self.in_progress)

    @property
    def in_progress(self) -> bool:
        return bool(self.pending)

    async def run(self, calls: list[llm_pb2.ToolCall], turn_number: int) -> list[tuple[llm_pb2.ToolResult, bool]]:
        """Ask the client for every call at once; returns (result, run_llm) in call order."""
        loop = asyncio.get_running_loop()
        for call in calls:
            self.pending[call.id] = loop.create_future()
            self.emit(events.tool_call(call, turn_number))
        self.on_change()
        try:
            # Each waits on its own future: an answer (or a cancel) may come before the waits start.
            return list(await asyncio.gather(*(self._answer(call.id, self.pending[call.id]) for call in calls)))
        except asyncio.CancelledError:
            self.cancel_all("interrupted")
            raise
        finally:
            self.on_change()

    async def _answer(self, call_id: str, future: asyncio.Future) -> tuple[llm_pb2.ToolResult, bool]:
        try:
            answer: pb.ToolCallResult = await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            self.pending.pop(call_id, None)
            future.cancel()
            self.emit(events.tool_call_cancelled([call_id], "timeout"))
            error = json.dumps({"error": f"the tool did not answer within {self.timeout_s:g} s"})
            return llm_pb2.ToolResult(tool_call_id=call_id, content=error, is_error=True), True
        run_llm = answer.run_llm if answer.HasField("run_llm") else True
        result = llm_pb2.ToolResult(tool_call_id=call_id, content=answer.content, is_error=answer.is_error,
                                    skip_reply=not run_llm)
        return result, run_llm

    def resolve(self, result: pb.ToolCallResult) -> None:
        """A client answer. One for a call nobody waits for any more gets a non-fatal error."""
        future = self.pending.pop(result.tool_call_id, None)
        if future is None or future.done():
            self.emit(events.error("FAILED_PRECONDITION", f"no tool call {result.tool_call_id!r} is waiting for a result "
                                   "(it finished, timed out or was cancelled)", "orchestrator"))
            return
        future.set_result(result)
        self.on_change()

    def cancel_all(self, reason: str) -> None:
        if not self.pending:
            return
        ids = list(self.pending)
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.emit(events.tool_call_cancelled(ids, reason))
        self.on_change()
