"""Function calling across the Converse stream: the LLM asks, the client runs the tool.

Each call becomes a ToolCallRequested event; the client answers with a ToolCallResult. All
calls of a round run in parallel, each with its own timeout (a late call gets an error
result, so the LLM can still answer). Barge-in cancels whatever is pending.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from voicemesh.v1 import common_pb2, llm_pb2, orchestrator_pb2 as pb


class ToolBroker:
    def __init__(self, emit: Callable[[pb.ConverseResponse], None], timeout_s: float):
        self.emit = emit
        self.timeout_s = timeout_s
        self.pending: dict[str, asyncio.Future] = {}
        self.on_change: Callable[[], None] = lambda: None  # mute strategies watch in_progress

    @property
    def in_progress(self) -> bool:
        return bool(self.pending)

    async def run(self, calls: list[llm_pb2.ToolCall], turn_number: int) -> list[tuple[llm_pb2.ToolResult, bool]]:
        """Ask the client for every call at once; returns (result, run_llm) in call order."""
        loop = asyncio.get_running_loop()
        for call in calls:
            self.pending[call.id] = loop.create_future()
            self.emit(pb.ConverseResponse(tool_call=pb.ToolCallRequested(
                id=call.id, name=call.name, arguments_json=call.arguments_json, turn_number=turn_number)))
        self.on_change()
        try:
            return list(await asyncio.gather(*(self._answer(call.id) for call in calls)))
        except asyncio.CancelledError:
            self.cancel_all("interrupted")
            raise
        finally:
            self.on_change()

    async def _answer(self, call_id: str) -> tuple[llm_pb2.ToolResult, bool]:
        future = self.pending[call_id]
        try:
            answer: pb.ToolCallResult = await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            self.pending.pop(call_id, None)
            future.cancel()
            self.emit(pb.ConverseResponse(tool_call_cancelled=pb.ToolCallCancelled(ids=[call_id], reason="timeout")))
            error = json.dumps({"error": f"the tool did not answer within {self.timeout_s:g} s"})
            return llm_pb2.ToolResult(tool_call_id=call_id, content=error, is_error=True), True
        run_llm = answer.run_llm if answer.HasField("run_llm") else True
        return llm_pb2.ToolResult(tool_call_id=call_id, content=answer.content, is_error=answer.is_error, skip_reply=not run_llm), run_llm

    def resolve(self, result: pb.ToolCallResult) -> None:
        """A client answer. One for a call nobody waits for any more gets a non-fatal error."""
        future = self.pending.pop(result.tool_call_id, None)
        if future is None or future.done():
            self.emit(pb.ConverseResponse(error=common_pb2.Error(
                code="FAILED_PRECONDITION", source="orchestrator", fatal=False,
                message=f"no tool call {result.tool_call_id!r} is waiting for a result (it finished, timed out or was cancelled)")))
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
        self.emit(pb.ConverseResponse(tool_call_cancelled=pb.ToolCallCancelled(ids=ids, reason=reason)))
        self.on_change()
