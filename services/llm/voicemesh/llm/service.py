"""The LLM service: one Generate call per turn, with the tool loop around a provider round."""
from __future__ import annotations

import contextlib
import json
import re
import time

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from voicemesh.llm.models import MODELS
from voicemesh.llm.providers.base import (
    ChatTurn,
    GenerationParams,
    LlmProvider,
    Queued,
    RoundEnd,
    TextDelta,
    ToolCallRequest,
    ToolSpec,
)
from voicemesh.runtime import telemetry
from voicemesh.runtime.errors import FailedPrecondition, InvalidInput, first_message, stream_guard
from voicemesh.runtime.server import ServicerBase, provider_service
from voicemesh.v1 import llm_pb2, llm_pb2_grpc

PROVIDERS = {
    "llamacpp": "voicemesh.llm.providers.llamacpp:LlamaCppLlmProvider",
    "openai": "voicemesh.llm.providers.openai_compat:OpenAiLlmProvider",
    "azure-openai": "voicemesh.llm.providers.openai_compat:AzureOpenAiLlmProvider",
    "bedrock": "voicemesh.llm.providers.bedrock:BedrockLlmProvider",
    "fake": "voicemesh.llm.providers.fake:FakeLlmProvider",  # scripted, for tests and the bench
}
ROLES = {"system", "user", "assistant", "tool"}
MAX_TOOL_ROUNDS = 8  # a model that keeps calling tools must not loop forever
MAX_TOKENS_LIMIT = 4096
MAX_TEMPERATURE = 2.0  # OpenAI's and Bedrock's upper bound; llama.cpp takes any
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FINISH = {"stop": llm_pb2.FINISH_REASON_STOP, "length": llm_pb2.FINISH_REASON_LENGTH}


def _json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise InvalidInput(f"Generate: {what} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"Generate: {what} must be a JSON object")
    return value


def parse_chat(chat: llm_pb2.ChatRequest) -> tuple[list[ChatTurn], list[ToolSpec], GenerationParams]:
    """Validate the wire request and turn it into provider types."""
    if not chat.messages:
        raise InvalidInput("Generate: chat.messages is empty; send at least one user message")
    messages = []
    for index, message in enumerate(chat.messages):
        if message.role not in ROLES:
            raise InvalidInput(f"Generate: messages[{index}].role {message.role!r} is not one of {sorted(ROLES)}")
        calls = [
            ToolCallRequest(call.id, call.name, _json_object(call.arguments_json, f"messages[{index}] tool call arguments"))
            for call in message.tool_calls
        ]
        messages.append(ChatTurn(message.role, message.content, calls, message.tool_call_id, message.name))
    tools = []
    for tool in chat.tools:
        if not _TOOL_NAME.match(tool.name):
            raise InvalidInput(f"Generate: tool name {tool.name!r} must be 1-64 letters, digits, '_' or '-'")
        tools.append(ToolSpec(tool.name, tool.description, _json_object(tool.parameters_json, f"tool {tool.name} parameters")))
    wire = chat.params
    if wire.max_tokens > MAX_TOKENS_LIMIT:
        raise InvalidInput(f"Generate: max_tokens {wire.max_tokens} is above the limit of {MAX_TOKENS_LIMIT}")
    # NaN or inf would reach the provider's sampler (a C library, or a cloud API that answers 400).
    if wire.HasField("temperature") and not 0 <= wire.temperature <= MAX_TEMPERATURE:
        raise InvalidInput(f"Generate: temperature {wire.temperature} is outside 0-{MAX_TEMPERATURE:g}")
    if not 0 <= wire.top_p <= 1:
        raise InvalidInput(f"Generate: top_p {wire.top_p} is outside 0-1 (0: the default)")
    defaults = GenerationParams()
    params = GenerationParams(
        max_tokens=wire.max_tokens or defaults.max_tokens,
        temperature=wire.temperature if wire.HasField("temperature") else defaults.temperature,
        top_p=wire.top_p or defaults.top_p,
        stop=tuple(wire.stop),
        seed=wire.seed if wire.HasField("seed") else None,
    )
    return messages, tools, params


class LlmServicer(ServicerBase, llm_pb2_grpc.LlmServiceServicer):
    kind = "llm"
    provider: LlmProvider

    async def Generate(self, request_iterator, context: grpc.aio.ServicerContext):
        async with stream_guard(context, "Generate"):
            self.require_ready()
            chat = await first_message(request_iterator, "chat", "Generate")
            messages, tools, params = parse_chat(chat)
            metadata = context.invocation_metadata()
            info = self.provider.info()
            user_text = next((m.content for m in reversed(messages) if m.role == "user"), "")
            attributes = {
                "gen_ai.system": info.provider, "gen_ai.request.model": info.model, "gen_ai.operation.name": "chat",
                "tools.count": len(tools), "input": telemetry.content(user_text), "session.id": chat.session_id,
                "turn.id": chat.turn_id, "speculative": telemetry.is_speculative(metadata),
            }
            with telemetry.service_span("llm", telemetry.context_from_metadata(metadata), attributes) as span:
                # Closed at once if the call ends mid-stream: the provider gives up its slot or place.
                async with contextlib.aclosing(self._rounds(request_iterator, messages, tools, params, span)) as rounds:
                    async for response in rounds:
                        yield response

    async def _rounds(self, request_iterator, messages, tools, params, span):
        """Generation rounds: each tool round trip with the caller starts another round."""
        started = time.monotonic()
        input_tokens = output_tokens = 0
        declared = {tool.name for tool in tools}
        reply: list[str] = []
        for _ in range(MAX_TOOL_ROUNDS):
            calls: list[ToolCallRequest] = []
            invented: list[ToolCallRequest] = []
            text = []
            finish = "stop"
            # Cancelling this call cancels the provider's stream, which stops generation.
            async with contextlib.aclosing(self.provider.stream(messages, tools, params)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        if not reply and not text:
                            span.set_attribute("metrics.ttfb", time.monotonic() - started)
                        text.append(event.text)
                        yield llm_pb2.GenerateResponse(delta=llm_pb2.TextDelta(text=event.text))
                    elif isinstance(event, ToolCallRequest) and event.name not in declared:
                        invented.append(event)  # small models invent tools; never ask the caller
                    elif isinstance(event, ToolCallRequest):
                        calls.append(event)
                        yield llm_pb2.GenerateResponse(
                            tool_call=llm_pb2.ToolCall(id=event.id, name=event.name, arguments_json=json.dumps(event.arguments))
                        )
                    elif isinstance(event, Queued):
                        span.add_event("queued", {"ahead": event.ahead, "waited_ms": event.waited_ms})
                        yield llm_pb2.GenerateResponse(queued=llm_pb2.Queued(ahead=event.ahead, waited_ms=event.waited_ms))
                    elif isinstance(event, RoundEnd):
                        finish = event.finish_reason
                        input_tokens += event.input_tokens
                        output_tokens += event.output_tokens
            reply.extend(text)
            telemetry.set_attributes(span, {
                "output": telemetry.content("".join(reply)),
                "gen_ai.usage.input_tokens": input_tokens, "gen_ai.usage.output_tokens": output_tokens,
            })
            if invented and not calls:
                messages.append(ChatTurn("assistant", "".join(text), invented))
                messages.extend(_unknown_tool_results(invented, declared))
                continue
            if not calls:
                usage = llm_pb2.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
                span.set_attribute("gen_ai.response.finish_reasons", [finish])
                yield llm_pb2.GenerateResponse(
                    done=llm_pb2.Done(finish_reason=_FINISH.get(finish, llm_pb2.FINISH_REASON_STOP), usage=usage)
                )
                return
            yield llm_pb2.GenerateResponse(
                awaiting_tool_results=llm_pb2.AwaitingToolResults(tool_call_ids=[call.id for call in calls])
            )
            messages.append(ChatTurn("assistant", "".join(text), calls))
            results, skip_reply = await _collect_tool_results(request_iterator, calls, span)
            messages.extend(results)
            if skip_reply:  # every result said: record it, say nothing more
                usage = llm_pb2.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
                yield llm_pb2.GenerateResponse(done=llm_pb2.Done(finish_reason=llm_pb2.FINISH_REASON_STOP, usage=usage))
                return
        raise FailedPrecondition(f"Generate: the model asked for tools more than {MAX_TOOL_ROUNDS} times in one turn")

    async def Info(self, request, context):
        return llm_pb2.LlmServiceInfoResponse(info=self.service_info())


def _unknown_tool_results(calls: list[ToolCallRequest], declared: set[str]) -> list[ChatTurn]:
    available = ", ".join(sorted(declared)) or "none"
    return [
        ChatTurn("tool", json.dumps({"error": f"there is no tool named {call.name!r} (available: {available}); answer in words"}),
                 tool_call_id=call.id)
        for call in calls
    ]


async def _collect_tool_results(request_iterator, calls: list[ToolCallRequest], llm_span) -> tuple[list[ChatTurn], bool]:
    """Wait for one result per call (any order); return them in call order, and whether every
    result asked to skip the reply.

    Each call gets an `llm_tool_call` span, child of the `llm` span, from the moment it was
    sent to the moment its result came back."""
    parent = trace.set_span_in_context(llm_span)
    spans = {}
    for call in calls:
        spans[call.id] = telemetry.tracer().start_span("llm_tool_call", context=parent)
        telemetry.set_attributes(spans[call.id], {
            "tool.name": call.name, "tool.call_id": call.id, "tool.arguments": telemetry.content(json.dumps(call.arguments)),
        })
    results: dict[str, ChatTurn] = {}
    skips: set[str] = set()
    expected = {call.id for call in calls}
    try:
        async for request in request_iterator:
            if request.WhichOneof("request") != "tool_result":
                raise InvalidInput("Generate: only tool_result messages may follow the chat request")
            result = request.tool_result
            if result.tool_call_id not in expected:
                raise InvalidInput(
                    f"Generate: tool_result for unknown call id {result.tool_call_id!r}; expected one of {sorted(expected)}"
                )
            content = result.content if not result.is_error else json.dumps({"error": result.content})
            results[result.tool_call_id] = ChatTurn("tool", content, tool_call_id=result.tool_call_id)
            if result.skip_reply:
                skips.add(result.tool_call_id)
            span = spans.pop(result.tool_call_id, None)
            if span is not None:
                telemetry.set_attributes(span, {"tool.result": telemetry.content(result.content),
                                                "tool.status": "error" if result.is_error else "success"})
                if result.is_error:
                    span.set_status(Status(StatusCode.ERROR, "the tool reported an error"))
                span.end()
            if len(results) == len(expected):
                return [results[call.id] for call in calls], skips == expected
        pending = len(expected) - len(results)
        raise FailedPrecondition(f"Generate: the request stream ended while {pending} tool result(s) were pending")
    finally:
        for span in spans.values():  # no result came back (cancelled or failed)
            span.set_attribute("tool.status", "cancelled")
            span.end()


DEFINITION = provider_service("llm", LlmServicer, llm_pb2, "LlmService", PROVIDERS, models=MODELS)
