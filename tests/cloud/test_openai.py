"""The `openai` and `azure-openai` LLM providers, through the real LLM service process.

- Text against the REAL llama.cpp HTTP server (xllamacpp, the embedded Qwen2.5 0.5B model, in
  this process): deltas stream, Done carries the usage, a wrong key is UNAUTHENTICATED (and
  health NOT_SERVING), and a cancelled Generate makes llama.cpp stop decoding.
- Tool calls, errors, retries, cancel, the probe and Azure against `OpenAiSseFake`, which speaks
  the same streaming protocol (the 0.5B model never returns structured tool calls).
- In-process unit tests of the mapping where a process adds nothing.
"""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import grpc
import pytest

from cloud.fakes.backends import Finish, ScriptedChat, TextPart, ToolCallPart
from cloud.fakes.openai_sse import OPENAI_ERRORS, OpenAiSseFake, start_llama_server
from support import WAIT_S, free_port
from voicemesh.cli.mesh import is_serving
from voicemesh.llm.providers.base import ChatTurn, GenerationParams, RoundEnd, ToolCallRequest
from voicemesh.llm.providers.openai_compat import (
    AzureOpenAiLlmProvider, AzureOpenAiSettings, OpenAiLlmProvider, OpenAiSettings, chat_messages,
)
from voicemesh.runtime.errors import NotFound, Unavailable
from voicemesh.v1 import llm_pb2, llm_pb2_grpc

FAKE_KEY = "sk-fake-openai-test"
AZURE_KEY = "azure-fake-key-0123456789"
WRONG_KEY = "sk-wrong-key-for-llama"
WEATHER = llm_pb2.Tool(name="get_weather", description="Current weather in a city",
                       parameters_json=json.dumps({"type": "object", "properties": {"city": {"type": "string"}},
                                                   "required": ["city"]}))


# --- helpers -------------------------------------------------------------------------------------
def chat(text: str = "What is the capital of France?", tools=(), max_tokens: int = 16, **params) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(chat=llm_pb2.ChatRequest(
        messages=[llm_pb2.ChatMessage(role="system", content="Answer in one short sentence."),
                  llm_pb2.ChatMessage(role="user", content=text)],
        tools=list(tools), params=llm_pb2.GenerationParams(max_tokens=max_tokens, **params)))


async def generate(address: str, first: llm_pb2.GenerateRequest, tool_results: dict[str, str] | None = None,
                   cancel_after_deltas: int = 0) -> tuple[list, grpc.StatusCode, str]:
    """One Generate call: answers each tool call by name from `tool_results`; cancels after that many
    deltas if asked. Returns the responses, the status and its details."""
    responses: list = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = llm_pb2_grpc.LlmServiceStub(channel).Generate()
        await call.write(first)
        calls: dict[str, str] = {}
        try:
            while (response := await asyncio.wait_for(call.read(), WAIT_S)) is not grpc.aio.EOF:
                responses.append(response)
                kind = response.WhichOneof("response")
                if kind == "tool_call":
                    calls[response.tool_call.id] = response.tool_call.name
                elif kind == "awaiting_tool_results":
                    for call_id in response.awaiting_tool_results.tool_call_ids:
                        await call.write(llm_pb2.GenerateRequest(tool_result=llm_pb2.ToolResult(
                            tool_call_id=call_id, content=(tool_results or {})[calls[call_id]])))
                elif kind == "delta" and cancel_after_deltas and len(of(responses, "delta")) >= cancel_after_deltas:
                    call.cancel()
                    return responses, grpc.StatusCode.CANCELLED, "cancelled by the test"
        except grpc.aio.AioRpcError as err:
            return responses, err.code(), err.details()
        return responses, grpc.StatusCode.OK, ""


def of(responses: list, kind: str) -> list:
    return [getattr(r, kind) for r in responses if r.WhichOneof("response") == kind]


def text_of(responses: list) -> str:
    return "".join(delta.text for delta in of(responses, "delta"))


def info(address: str) -> llm_pb2.LlmServiceInfoResponse:
    with grpc.insecure_channel(address) as channel:
        return llm_pb2_grpc.LlmServiceStub(channel).Info(llm_pb2.LlmServiceInfoRequest(), timeout=10).info


def wait_health(address: str, serving: bool, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        while (state := is_serving(channel)) != serving:
            assert time.monotonic() < deadline, f"{address}: health still {'SERVING' if state else 'NOT_SERVING'}"
            time.sleep(0.1)


def wait_log(service, text: str, timeout: float = WAIT_S) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := service.log()):
        assert service.proc.poll() is None, f"the service exited:\n{log}"
        assert time.monotonic() < deadline, f"{text!r} never appeared in the log:\n{log[-3000:]}"
        time.sleep(0.1)
    return log


class Endless:
    """A backend that never finishes by itself: text parts, paced, until the client goes."""

    async def chat(self, messages, tools):
        for n in range(100_000):
            yield TextPart(f"word{n} ")
            await asyncio.sleep(0.02)


class Stalled:
    """A backend that sends nothing after the first chunk (for the read timeout)."""

    async def chat(self, messages, tools):
        await asyncio.Event().wait()
        yield TextPart("never")


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    server = start_llama_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def llama_service(provider_services, llama):
    return provider_services.start("llm", "openai", {
        "VOICEMESH_LLM_OPENAI_BASE_URL": llama.base_url, "VOICEMESH_LLM_OPENAI_MODEL": llama.model,
        "OPENAI_API_KEY": llama.api_key}, name="llm-openai-llama")


@pytest.fixture(scope="module")
def fake():
    with OpenAiSseFake(api_key=FAKE_KEY, models=("gpt-fake",)) as server:
        yield server


@pytest.fixture(scope="module")
def fake_service(provider_services, fake, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("openai-key") / "api-key"
    key_file.write_text(FAKE_KEY + "\n")
    return provider_services.start("llm", "openai", {
        "VOICEMESH_LLM_OPENAI_BASE_URL": fake.base_url, "VOICEMESH_LLM_OPENAI_MODEL": "gpt-fake",
        "VOICEMESH_LLM_OPENAI_API_KEY_FILE": str(key_file), "OPENAI_API_KEY": "",
        "VOICEMESH_LLM_OPENAI_MAX_RETRIES": "1", "VOICEMESH_LLM_OPENAI_TIMEOUT_SECONDS": "3",
        "VOICEMESH_LLM_PROBE_SECONDS": "0.5"}, name="llm-openai-fake")


@pytest.fixture
def backend(fake):
    """Each test scripts the fake's answers; the default is restored afterwards."""
    original = fake.backend
    yield fake
    fake.backend = original


@pytest.fixture(scope="module")
def azure_fake():
    with OpenAiSseFake(api_key=AZURE_KEY, azure=True, deployment="voicemesh-gpt") as server:
        yield server


@pytest.fixture(scope="module")
def azure_service(provider_services, azure_fake):
    return provider_services.start("llm", "azure-openai", {
        "VOICEMESH_LLM_AZURE_OPENAI_ENDPOINT": azure_fake.endpoint, "VOICEMESH_LLM_AZURE_OPENAI_DEPLOYMENT": "voicemesh-gpt",
        "AZURE_OPENAI_API_KEY": AZURE_KEY, "VOICEMESH_LLM_AZURE_OPENAI_MAX_RETRIES": "0",
        "VOICEMESH_LLM_PROBE_SECONDS": "0.5"}, name="llm-azure-openai")


# --- the real llama.cpp server ---------------------------------------------------------------------
@pytest.mark.models  # the embedded model behind llama.cpp's server
async def test_llama_text_streams_with_usage(llama_service):
    responses, code, details = await generate(llama_service.address, chat("Say hello to Ada.", max_tokens=12))
    assert code == grpc.StatusCode.OK, details
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds.count("delta") >= 2 and kinds[-1] == "done", kinds  # token by token, then one Done
    done = responses[-1].done
    assert done.usage.input_tokens > 0 and 0 < done.usage.output_tokens <= 12, done
    assert done.finish_reason in (llm_pb2.FINISH_REASON_STOP, llm_pb2.FINISH_REASON_LENGTH)
    assert text_of(responses).strip()


@pytest.mark.models  # the embedded model behind llama.cpp's server
async def test_llama_cancel_stops_decoding(llama_service, llama):
    root, headers = llama.base_url.removesuffix("/v1"), {"Authorization": f"Bearer {llama.api_key}"}

    async def metrics(session) -> dict[str, float]:
        async with session.get(f"{root}/metrics", headers=headers) as response:
            lines = (await response.text()).splitlines()
        return {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")}

    async with aiohttp.ClientSession() as session:
        before = await metrics(session)
        # The model counts on and on; only the cancel can stop it short of 400 tokens.
        responses, code, _ = await generate(llama_service.address, chat("Count from 1 to 1000, separated by commas.",
                                                                        max_tokens=400), cancel_after_deltas=3)
        assert code == grpc.StatusCode.CANCELLED and len(of(responses, "delta")) == 3
        deadline = time.monotonic() + WAIT_S
        while (after := await metrics(session))["llamacpp:requests_processing"] > 0:
            assert time.monotonic() < deadline, f"llama.cpp still generating after the cancel: {after}"
            await asyncio.sleep(0.1)
    decoded = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
    assert 3 <= decoded < 200, f"llama.cpp decoded {decoded:.0f} tokens: the cancel did not stop it"


@pytest.mark.models  # the embedded model behind llama.cpp's server
async def test_llama_wrong_key_unauthenticated_and_not_serving(provider_services, llama):
    service = provider_services.start("llm", "openai", {
        "VOICEMESH_LLM_OPENAI_BASE_URL": llama.base_url, "VOICEMESH_LLM_OPENAI_MODEL": llama.model,
        "OPENAI_API_KEY": WRONG_KEY}, name="llm-openai-wrong-key", wait=False)
    log = wait_log(service, "provider unreachable, not serving")
    assert "Invalid API Key" in log and "401" in log
    wait_health(service.address, serving=False, timeout=1)
    _, code, details = await generate(service.address, chat())
    assert code == grpc.StatusCode.UNAUTHENTICATED, details
    assert "openai" in details and llama.model in details and "OPENAI_API_KEY" in details, details
    provider_services.stop(service)
    assert WRONG_KEY not in service.log()


# --- the fake: tool calls ----------------------------------------------------------------------------
async def test_tool_call_round_trip(fake_service, backend):
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    backend.backend = ScriptedChat(rounds=[
        [TextPart("Let me check. "), ToolCallPart("call_w1", "get_weather", arguments), Finish("tool_calls", 30, 12)],
        [TextPart("It is 18 degrees "), TextPart("in Paris."), Finish("stop", 52, 7)],
    ])
    before = len(backend.seen("request"))
    responses, code, details = await generate(fake_service.address, chat("Weather in Paris?", tools=[WEATHER], max_tokens=64,
                                                                         temperature=0.3, stop=["\n\n"], seed=7),
                                              tool_results={"get_weather": '{"temp_c": 18}'})
    assert code == grpc.StatusCode.OK, details
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds == ["delta", "tool_call", "awaiting_tool_results", "delta", "delta", "done"], kinds
    call = of(responses, "tool_call")[0]
    assert (call.id, call.name, json.loads(call.arguments_json)) == ("call_w1", "get_weather", json.loads(arguments))
    assert text_of(responses) == "Let me check. It is 18 degrees in Paris."
    assert responses[-1].done.usage == llm_pb2.Usage(input_tokens=82, output_tokens=19)

    first, second = (r["body"] for r in backend.seen("request")[before:])
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True} and first["model"] == "gpt-fake"
    assert first["max_tokens"] == 64 and first["seed"] == 7 and first["stop"] == ["\n\n"]
    assert abs(first["temperature"] - 0.3) < 1e-6
    assert first["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city", "parameters": json.loads(WEATHER.parameters_json)}}]
    assert second["messages"][-2:] == [
        {"role": "assistant", "content": "Let me check. ", "tool_calls": [
            {"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_w1", "content": '{"temp_c": 18}'}]


async def test_two_tool_calls_in_one_round(fake_service, backend):
    backend.backend = ScriptedChat(rounds=[
        [ToolCallPart("call_a", "get_weather", '{"city": "Oslo"}'), ToolCallPart("call_b", "get_weather", '{"city": "Rome"}'),
         Finish("tool_calls", 10, 20)],
        [TextPart("Cold in Oslo, warm in Rome."), Finish("stop", 30, 8)],
    ])
    responses, code, details = await generate(fake_service.address, chat("Oslo and Rome?", tools=[WEATHER]),
                                              tool_results={"get_weather": '{"ok": true}'})
    assert code == grpc.StatusCode.OK, details
    assert [(c.id, json.loads(c.arguments_json)["city"]) for c in of(responses, "tool_call")] == [
        ("call_a", "Oslo"), ("call_b", "Rome")]
    assert of(responses, "awaiting_tool_results")[0].tool_call_ids == ["call_a", "call_b"]


@pytest.mark.parametrize("finish, code, message", [
    ("tool_calls", grpc.StatusCode.INTERNAL, "not valid JSON"),
    ("length", grpc.StatusCode.INVALID_ARGUMENT, "ran out of tokens"),
])
async def test_broken_tool_arguments(fake_service, backend, finish, code, message):
    backend.backend = ScriptedChat(rounds=[[ToolCallPart("call_x", "get_weather", '{"city": "Par'), Finish(finish, 5, 5)]])
    _, status, details = await generate(fake_service.address, chat(tools=[WEATHER]))
    assert status == code, details
    assert message in details and "get_weather" in details and "gpt-fake" in details, details


# --- the fake: errors, retries, cancel -----------------------------------------------------------
ERRORS = {
    "auth": (grpc.StatusCode.UNAUTHENTICATED, "Incorrect API key provided", 1),
    "permission": (grpc.StatusCode.PERMISSION_DENIED, "does not have access to model", 1),
    "throttle": (grpc.StatusCode.RESOURCE_EXHAUSTED, "Rate limit reached", 2),  # retried once, then final
    "not_found": (grpc.StatusCode.NOT_FOUND, "does not exist", 1),
    "bad_format": (grpc.StatusCode.INVALID_ARGUMENT, "Invalid value for 'temperature'", 1),
    "unavailable": (grpc.StatusCode.UNAVAILABLE, "overloaded", 2),
}


@pytest.mark.parametrize("error_class", sorted(ERRORS))
async def test_errors_map_to_status(fake_service, fake, error_class):
    code, message, attempts = ERRORS[error_class]
    for _ in range(attempts):
        if error_class == "permission":
            fake.fail_next_http(*OPENAI_ERRORS["permission"])
        else:
            fake.fail_next(error_class)
    before = len(fake.seen("request"))
    _, status, details = await generate(fake_service.address, chat())
    assert status == code, details
    assert message in details and "openai (model 'gpt-fake')" in details, details
    assert len(fake.seen("request")) - before == attempts  # SDK retries: only the transient ones, before any chunk


async def test_transient_failure_retried_before_the_first_chunk(fake_service, fake):
    fake.fail_next("unavailable")
    before = len(fake.seen("request"))
    responses, code, details = await generate(fake_service.address, chat())
    assert code == grpc.StatusCode.OK, details
    assert text_of(responses) == "Paris is the capital of France."
    assert len(fake.seen("request")) - before == 2


async def test_stall_mid_stream_is_deadline_exceeded_and_not_retried(fake_service, backend):
    backend.backend = Stalled()
    before = len(backend.seen("request"))
    _, code, details = await generate(fake_service.address, chat())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
    assert "within 3 s" in details
    assert len(backend.seen("request")) - before == 1  # chunks had started: never replayed
    number = backend.seen("request")[-1]["number"]
    backend.wait_for("closed", where=lambda n: n == number)


async def test_cancel_closes_the_upstream_stream(fake_service, backend):
    backend.backend = Endless()
    responses, code, _ = await generate(fake_service.address, chat(), cancel_after_deltas=3)
    assert code == grpc.StatusCode.CANCELLED and text_of(responses) == "word0 word1 word2 "
    number = backend.seen("request")[-1]["number"]
    backend.wait_for("closed", where=lambda n: n == number)  # the fake saw the client go
    assert number not in backend.seen("completed")


async def test_bad_input_never_reaches_the_provider(fake_service, fake):
    before = len(fake.seen("request"))
    empty = llm_pb2.GenerateRequest(chat=llm_pb2.ChatRequest())
    _, code, details = await generate(fake_service.address, empty)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "messages is empty" in details
    _, code, details = await generate(fake_service.address, chat(max_tokens=100_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "above the limit" in details
    assert len(fake.seen("request")) == before


# --- the fake: health, Info, secrets -------------------------------------------------------------
def test_probe_follows_the_key(fake_service, fake):
    wait_health(fake_service.address, serving=True)
    models = fake.seen("models")
    assert models and models[-1]["path"] == "/v1/models" and models[-1]["auth"] == FAKE_KEY
    fake.api_key = "rotated-key"  # the provider now refuses the service's key
    try:
        wait_health(fake_service.address, serving=False)
        assert "Incorrect API key provided" in wait_log(fake_service, "provider unreachable, not serving")
    finally:
        fake.api_key = FAKE_KEY
    wait_health(fake_service.address, serving=True)


def test_info_has_no_secret(fake_service):
    service_info = info(fake_service.address)
    assert (service_info.provider, service_info.model) == ("openai", "gpt-fake")
    fake_url = service_info.details["base_url"]
    assert fake_url.startswith("http://127.0.0.1:") and fake_url.endswith("/v1")
    assert service_info.details["credentials"].endswith("api-key")  # the file's path, not its content
    assert FAKE_KEY not in str(service_info)


def test_no_secret_in_the_log(fake_service):
    log = fake_service.log()
    assert "gpt-fake" in log and FAKE_KEY not in log


# --- Azure OpenAI ----------------------------------------------------------------------------------
async def test_azure_stream_path_key_and_filter_chunk(azure_service, azure_fake):
    azure_fake.backend = ScriptedChat(rounds=[
        [ToolCallPart("call_z", "get_weather", '{"city": "Lyon"}'), Finish("tool_calls", 11, 6)],
        [TextPart("Mild in "), TextPart("Lyon."), Finish("stop", 20, 3)]])
    responses, code, details = await generate(azure_service.address, chat(tools=[WEATHER]),
                                              tool_results={"get_weather": '{"temp_c": 15}'})
    assert code == grpc.StatusCode.OK, details
    assert text_of(responses) == "Mild in Lyon." and responses[-1].done.usage.output_tokens == 9
    for request in azure_fake.seen("request")[-2:]:
        assert request["path"] == "/openai/deployments/voicemesh-gpt/chat/completions"
        assert request["query"] == {"api-version": "2024-10-21"} and request["auth"] == AZURE_KEY
    assert azure_fake.seen("models")[-1]["path"] == "/openai/models"


@pytest.mark.parametrize("error_class, code, message", [
    ("auth", grpc.StatusCode.UNAUTHENTICATED, "invalid subscription key"),
    ("not_found", grpc.StatusCode.NOT_FOUND, "deployment 'voicemesh-gpt' does not exist"),
    ("throttle", grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeded token rate limit"),
])
async def test_azure_errors(azure_service, azure_fake, error_class, code, message):
    azure_fake.fail_next(error_class)
    _, status, details = await generate(azure_service.address, chat())
    assert status == code, details
    assert message in details and "azure-openai" in details, details


def test_azure_info_and_log(azure_service):
    service_info = info(azure_service.address)
    assert (service_info.provider, service_info.model) == ("azure-openai", "voicemesh-gpt")
    assert service_info.details["deployment"] == "voicemesh-gpt" and service_info.details["api_version"] == "2024-10-21"
    assert service_info.details["credentials"] == "AZURE_OPENAI_API_KEY"
    assert AZURE_KEY not in str(service_info) and AZURE_KEY not in azure_service.log()


# --- in-process units ----------------------------------------------------------------------------
def test_messages_and_request_mapping(monkeypatch):
    turns = [ChatTurn("system", "Be brief."), ChatTurn("user", "Hi", name="ada"),
             ChatTurn("assistant", "", [ToolCallRequest("c1", "f", {"x": 1})]), ChatTurn("tool", "42", tool_call_id="c1")]
    assert chat_messages(turns) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ada"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    provider = OpenAiLlmProvider(OpenAiSettings(max_tokens_field="max_completion_tokens", send_sampling=False))
    request = provider._request(turns, [], GenerationParams(max_tokens=50))
    assert request["max_completion_tokens"] == 50 and "max_tokens" not in request and "temperature" not in request
    assert provider.info().details["credentials"] == "none"


def test_azure_needs_a_key(monkeypatch):
    monkeypatch.delenv("AZURE_OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="AZURE_OPENAI_API_KEY"):
        AzureOpenAiLlmProvider(AzureOpenAiSettings(endpoint="https://x.openai.azure.com", deployment="d"))


async def test_no_key_server_and_dropped_stream(monkeypatch):
    """A server without auth works without a key; a stream cut before its end is UNAVAILABLE."""
    class Dropping:
        async def chat(self, messages, tools):
            yield TextPart("Hello ")
            raise RuntimeError("the fake drops the connection")

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with OpenAiSseFake(api_key=None, models=None) as server:
        provider = OpenAiLlmProvider(OpenAiSettings(base_url=server.base_url, model="any", max_retries=0))
        await provider.load()
        try:
            assert await provider.probe() is None
            events = [e async for e in provider.stream([ChatTurn("user", "hi")], [], GenerationParams())]
            assert events[-1].finish_reason == "stop" and server.seen("request")[0]["auth"] == "no-key"
            server.backend = Dropping()
            with pytest.raises(Unavailable, match="lost the connection"):
                async for _ in provider.stream([ChatTurn("user", "hi")], [], GenerationParams()):
                    pass
        finally:
            await provider.close()


async def test_unreachable_server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unit")
    provider = OpenAiLlmProvider(OpenAiSettings(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0))
    await provider.load()
    try:
        assert "cannot connect to" in (await provider.probe() or "")
        with pytest.raises(Unavailable, match="cannot connect to http://127.0.0.1"):
            async for _ in provider.stream([ChatTurn("user", "hi")], [], GenerationParams()):
                pass
    finally:
        await provider.close()


async def test_unknown_model_deployment_and_api_version(fake, azure_fake, monkeypatch):
    """What the servers answer by themselves (no fail_next): a model, a deployment or an api-version they lack."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", AZURE_KEY)
    cases = [
        (OpenAiLlmProvider(OpenAiSettings(base_url=fake.base_url, model="gpt-nope", max_retries=0)),
         "model `gpt-nope` does not exist"),
        (AzureOpenAiLlmProvider(AzureOpenAiSettings(endpoint=azure_fake.endpoint, deployment="other", max_retries=0)),
         "deployment 'other' does not exist"),
        (AzureOpenAiLlmProvider(AzureOpenAiSettings(endpoint=azure_fake.endpoint, deployment="voicemesh-gpt",
                                                    api_version="2023-01-01", max_retries=0)), "Resource not found"),
    ]
    for provider, message in cases:
        await provider.load()
        try:
            with pytest.raises(NotFound, match=message):
                async for _ in provider.stream([ChatTurn("user", "hi")], [], GenerationParams()):
                    pass
        finally:
            await provider.close()


async def test_calls_numbered_zero_and_finish_stop(monkeypatch):
    """Servers that number every call 0 (each with its own id) and finish with "stop" still give two calls."""
    from openai.types.chat import ChatCompletionChunk

    def chunk(delta: dict, finish=None) -> ChatCompletionChunk:
        return ChatCompletionChunk.model_validate({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    class Chunks:
        def __init__(self, items):
            self.items, self.closed = items, False

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            self.closed = True

        async def __aiter__(self):
            for item in self.items:
                yield item

    upstream = Chunks([
        chunk({"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": '{"n":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}),
        chunk({}, "stop"),
    ])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unit")
    provider = OpenAiLlmProvider(OpenAiSettings())
    await provider.load()

    async def create(**request):
        return upstream

    monkeypatch.setattr(provider._client.chat.completions, "create", create)
    events = [e async for e in provider.stream([ChatTurn("user", "hi")], [], GenerationParams())]
    await provider.close()
    assert events == [ToolCallRequest("a", "f", {"n": 1}), ToolCallRequest("b", "g", {}), RoundEnd("tool_calls", 0, 0)]
    assert upstream.closed
