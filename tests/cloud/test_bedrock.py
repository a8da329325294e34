"""The Bedrock LLM provider: a real `voicemesh-serve llm --provider bedrock` process, boto3 inside
it, talking to a fake Bedrock (tests/cloud/fakes/bedrock.py) on 127.0.0.1.

Nothing here waits on time: each wait is for an event (a response, a fake's record, a health
change) with a deadline that fails saying what was seen. A few in-process tests check the
request mapping, the error table and the API-key path directly.
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import ssl
import subprocess
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.conftest import DUMMY_AWS
from cloud.fakes.backends import Finish, ScriptedChat, TextPart, ToolCallPart
from cloud.fakes.base import ERROR_CLASSES
from cloud.fakes.bedrock import FakeBedrock
from test_services_bad_input import LLM_CASES
from voicemesh.llm.providers.base import ChatTurn, GenerationParams, RoundEnd, TextDelta, ToolCallRequest, ToolSpec
from voicemesh.llm.providers.bedrock import (
    CONVERSATION_START, BedrockLlmProvider, BedrockSettings, bedrock_error, converse_messages,
)
from voicemesh.v1 import llm_pb2, llm_pb2_grpc

WAIT_S = 60.0
ATTEMPTS = 2  # the service's max_attempts: retried error classes must fail this many times in a row
WEATHER = llm_pb2.Tool(name="get_weather", description="Current weather for a city.",
                       parameters_json=json.dumps({"type": "object", "properties": {"city": {"type": "string"}},
                                                   "required": ["city"]}))
Status = grpc.StatusCode


class Gated:
    """A chat backend that gives one part, then waits for the test (`release`) before the rest, so
    a test can see the first delta arrive while the "model" is still generating, or cancel then."""

    def __init__(self, rest: tuple = (TextPart(" there was a dragon."), Finish("stop", 9, 7))):
        self.rest = rest
        self.gate = threading.Event()

    def release(self) -> None:
        self.gate.set()

    async def chat(self, messages, tools):
        yield TextPart("Once upon a time")
        await asyncio.to_thread(self.gate.wait, 2 * WAIT_S)  # a cancelled handler stops waiting at once
        for part in self.rest:
            yield part


@pytest.fixture(scope="module")
def fake():
    with FakeBedrock() as running:
        yield running


@pytest.fixture(autouse=True)
def scripted(fake):
    """Every test starts with the default scripted answer and no pending failures."""
    fake.backend, fake.refuse_auth, fake.fail_probe_next = ScriptedChat(), False, None
    fake.models = {"amazon.nova-lite-v1:0", "anthropic.claude-3-haiku-20240307-v1:0"}
    while fake.take_failure() or fake._take():
        pass


@pytest.fixture(scope="module")
def service(fake, provider_services):
    env = {**DUMMY_AWS, **fake.env(), "VOICEMESH_LLM_BEDROCK_MAX_ATTEMPTS": str(ATTEMPTS), "VOICEMESH_LLM_PROBE_SECONDS": "0.5"}
    return provider_services.start("llm", "bedrock", env)


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(service.address) as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)


def chat(text: str = "What is the capital of France?", tools=(), **params) -> llm_pb2.GenerateRequest:
    messages = [llm_pb2.ChatMessage(role="system", content="Answer in one sentence."),
                llm_pb2.ChatMessage(role="user", content=text)]
    return llm_pb2.GenerateRequest(chat=llm_pb2.ChatRequest(messages=messages, tools=list(tools),
                                                            params=llm_pb2.GenerationParams(**params)))


def generate(stub, *requests) -> tuple[list[llm_pb2.GenerateResponse], Status, str]:
    responses = []
    try:
        for response in stub.Generate(iter(requests), timeout=WAIT_S):
            responses.append(response)
    except grpc.RpcError as err:
        return responses, err.code(), err.details()
    return responses, Status.OK, ""


def text_of(responses) -> str:
    return "".join(r.delta.text for r in responses if r.HasField("delta"))


# --- streaming --------------------------------------------------------------------------------
def test_streams_text_deltas_and_usage(stub, fake):
    before = len(fake.seen("request"))
    responses, status, details = generate(stub, chat(max_tokens=64, stop=["\n\n"]))
    assert status == Status.OK, details
    assert [r.delta.text for r in responses if r.HasField("delta")] == ["Paris is the capital ", "of France."]
    done = responses[-1].done
    assert done.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert (done.usage.input_tokens, done.usage.output_tokens) == (20, 8)
    request = fake.seen("request")[before]
    assert request["raw_path"] == "/model/amazon.nova-lite-v1%3A0/converse-stream"  # the model id URL-encoded
    body = request["body"]
    assert body["system"] == [{"text": "Answer in one sentence."}]
    assert body["messages"] == [{"role": "user", "content": [{"text": "What is the capital of France?"}]}]
    assert body["inferenceConfig"]["maxTokens"] == 64 and body["inferenceConfig"]["stopSequences"] == ["\n\n"]
    auth = [a for a in fake.seen("auth") if a["path"].endswith("/converse-stream")][-1]
    assert auth["scheme"] == "AWS4-HMAC-SHA256" and auth["scope"] == "us-east-1/bedrock/aws4_request"


def test_deltas_arrive_while_the_model_is_still_generating(stub, fake):
    fake.backend = backend = Gated()
    done_before = len(fake.seen("done"))
    responses = stub.Generate(iter([chat()]), timeout=WAIT_S)
    first = next(responses)
    assert first.delta.text == "Once upon a time"
    assert len(fake.seen("done")) == done_before, "the fake finished before the first delta reached the caller"
    backend.release()
    rest = list(responses)
    assert text_of(rest) == " there was a dragon." and rest[-1].HasField("done")


def test_tool_call_round_trip(stub, fake):
    arguments = '{"city": "Paris", "unit": "celsius"}'
    fake.backend = ScriptedChat(rounds=[
        [TextPart("Let me check. "), ToolCallPart("tooluse_Wx1", "get_weather", arguments), Finish("tool_calls", 30, 12)],
        [TextPart("It is 21 degrees "), TextPart("in Paris."), Finish("stop", 50, 6)],
    ])
    before = len(fake.seen("request"))
    requests: queue.Queue = queue.Queue()
    requests.put(chat("Weather in Paris?", tools=[WEATHER]))
    call = stub.Generate(iter(requests.get, None), timeout=WAIT_S)
    seen = []
    for response in call:
        seen.append(response)
        if response.HasField("awaiting_tool_results"):
            assert list(response.awaiting_tool_results.tool_call_ids) == ["tooluse_Wx1"]
            requests.put(llm_pb2.GenerateRequest(tool_result=llm_pb2.ToolResult(tool_call_id="tooluse_Wx1",
                                                                                content='{"temp_c": 21}')))
        if response.HasField("done"):
            requests.put(None)
    calls = [r.tool_call for r in seen if r.HasField("tool_call")]
    assert [(c.id, c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("tooluse_Wx1", "get_weather", {"city": "Paris", "unit": "celsius"})]
    assert fake.seen("fragments")[-1] > 1, "the tool input should have come in several deltas"
    assert text_of(seen) == "Let me check. It is 21 degrees in Paris."
    assert (seen[-1].done.usage.input_tokens, seen[-1].done.usage.output_tokens) == (80, 18)
    first, second = (r["body"] for r in fake.seen("request")[before:before + 2])
    assert first["toolConfig"]["tools"][0]["toolSpec"]["name"] == "get_weather"
    assert first["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"]["json"]["required"] == ["city"]
    assert second["messages"][-2] == {"role": "assistant", "content": [
        {"text": "Let me check. "},
        {"toolUse": {"toolUseId": "tooluse_Wx1", "name": "get_weather", "input": {"city": "Paris", "unit": "celsius"}}}]}
    assert second["messages"][-1] == {"role": "user", "content": [
        {"toolResult": {"toolUseId": "tooluse_Wx1", "content": [{"json": {"temp_c": 21}}]}}]}
    assert "toolConfig" in second


def test_cancel_closes_the_upstream_stream(stub, fake):
    fake.backend = backend = Gated()
    try:
        responses = stub.Generate(iter([chat("Tell me a long story.")]), timeout=WAIT_S)
        assert next(responses).delta.text == "Once upon a time"
        responses.cancel()  # barge-in: the caller drops the call
        fake.wait_for("cancelled", timeout=WAIT_S, where=lambda seen: seen["prompt"] == "Tell me a long story.")
    finally:
        backend.release()
    fake.backend = ScriptedChat()
    assert generate(stub, chat())[1] == Status.OK  # still serving


# --- errors -----------------------------------------------------------------------------------
ERROR_STATUS = {"auth": (Status.UNAUTHENTICATED, "UnrecognizedClientException"),
                "throttle": (Status.RESOURCE_EXHAUSTED, "ThrottlingException"),
                "not_found": (Status.NOT_FOUND, "no such model"),
                "bad_format": (Status.INVALID_ARGUMENT, "Malformed input request"),
                "unavailable": (Status.UNAVAILABLE, "ServiceUnavailableException")}
RETRIED = {"throttle", "unavailable"}  # botocore's standard mode retries these before the stream


@pytest.mark.parametrize("error_class", ERROR_CLASSES)
def test_error_classes_map_to_statuses(stub, fake, error_class):
    code, words = ERROR_STATUS[error_class]
    for _ in range(ATTEMPTS if error_class in RETRIED else 1):
        fake.fail_next(error_class)
    before = len(fake.seen("request"))
    _, status, details = generate(stub, chat())
    assert (status, details.startswith("bedrock: ")) == (code, True), details
    assert words in details and "amazon.nova-lite-v1:0" in details
    assert len(fake.seen("request")) - before == (ATTEMPTS if error_class in RETRIED else 1)


@pytest.mark.parametrize("status_code,code,message,expected,attempts", [
    (403, "AccessDeniedException", "You don't have access to the model with the specified model ID.",
     Status.PERMISSION_DENIED, 1),
    (400, "ServiceQuotaExceededException", "Your request exceeds the service quota.", Status.RESOURCE_EXHAUSTED, 1),
    (404, "ResourceNotFoundException", "Model not found.", Status.NOT_FOUND, 1),
    (429, "ModelNotReadyException", "Model is not ready.", Status.UNAVAILABLE, ATTEMPTS),
])
def test_more_bedrock_errors(stub, fake, status_code, code, message, expected, attempts):
    for _ in range(attempts):
        fake.fail_next_with(status_code, code, message)
    _, status, details = generate(stub, chat())
    assert status == expected and code in details, details


@pytest.mark.parametrize("code,expected", [("modelStreamErrorException", Status.UNAVAILABLE),
                                           ("throttlingException", Status.RESOURCE_EXHAUSTED),
                                           ("validationException", Status.INVALID_ARGUMENT)])
def test_in_stream_exception_is_final(stub, fake, code, expected):
    fake.fail_in_stream(code, "the model stopped", after_parts=1)
    before = len(fake.seen("request"))
    responses, status, details = generate(stub, chat())
    assert text_of(responses) == "Paris is the capital "  # what came before the failure still came
    assert status == expected and code in details and "the model stopped" in details, details
    assert len(fake.seen("request")) - before == 1, "a failure mid-stream must never be retried"


def test_transient_failure_before_the_stream_is_retried(stub, fake):
    fake.fail_next("unavailable")
    before = len(fake.seen("request"))
    responses, status, details = generate(stub, chat())
    assert status == Status.OK, details
    assert text_of(responses) == "Paris is the capital of France."
    assert len(fake.seen("request")) - before == 2


@pytest.mark.parametrize("case", sorted(LLM_CASES))
def test_service_rejects_bad_input(stub, case):
    requests, code, message = LLM_CASES[case]
    _, status, details = generate(stub, *requests)
    assert status == code and message in details, details


def test_unknown_model_is_not_found_and_not_serving(stub, service, fake):
    fake.models = set()  # as if the configured model did not exist in this region
    _, status, details = generate(stub, chat())
    assert status == Status.NOT_FOUND and "no such model" in details, details
    health_until(service.address, health_pb2.HealthCheckResponse.NOT_SERVING)
    fake.models = {"amazon.nova-lite-v1:0"}
    health_until(service.address, health_pb2.HealthCheckResponse.SERVING)


# --- health, info, secrets --------------------------------------------------------------------
def health_until(address: str, wanted: int) -> None:
    seen = []
    with grpc.insecure_channel(address) as channel:
        try:
            for response in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S):
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
                if response.status == wanted:
                    return
        except grpc.RpcError as err:
            raise AssertionError(f"health never became {wanted}; saw {seen} ({err.code().name})") from None


def test_health_follows_the_probe(service, fake):
    health_until(service.address, health_pb2.HealthCheckResponse.SERVING)
    fake.refuse_auth = True  # credentials refused
    health_until(service.address, health_pb2.HealthCheckResponse.NOT_SERVING)
    fake.refuse_auth = False
    health_until(service.address, health_pb2.HealthCheckResponse.SERVING)
    fake.pause()  # the endpoint is gone
    try:
        health_until(service.address, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        fake.resume()
    health_until(service.address, health_pb2.HealthCheckResponse.SERVING)
    assert "UnrecognizedClientException" in service.log() and "cannot reach Bedrock" in service.log()


def test_info_reports_model_and_region_without_secrets(stub, fake):
    info = stub.Info(llm_pb2.LlmServiceInfoRequest(), timeout=10).info
    assert (info.provider, info.model) == ("bedrock", "amazon.nova-lite-v1:0")
    assert info.details["region"] == "us-east-1" and info.details["endpoint"] == fake.endpoint
    assert info.details["credentials"] == "env"
    wire = info.SerializeToString()
    assert DUMMY_AWS["AWS_SECRET_ACCESS_KEY"].encode() not in wire and DUMMY_AWS["AWS_ACCESS_KEY_ID"].encode() not in wire


def test_no_secret_in_the_log(stub, service):
    generate(stub, chat())
    log = service.log()
    assert "bedrock ready" in log
    assert DUMMY_AWS["AWS_SECRET_ACCESS_KEY"] not in log


# --- in process: mapping, errors, API key -----------------------------------------------------
def test_converse_messages_alternate_and_start_with_the_user():
    call = ToolCallRequest("t1", "lookup", {"q": "x"})
    turns = [ChatTurn("system", "sys"), ChatTurn("assistant", "Hello, how can I help?"), ChatTurn("user", "Find x."),
             ChatTurn("user", "Quickly."), ChatTurn("assistant", "", [call]), ChatTurn("tool", "plain text", tool_call_id="t1"),
             ChatTurn("user", "")]
    native = converse_messages(turns)
    assert native[0] == {"role": "user", "content": [{"text": CONVERSATION_START}]}
    assert [m["role"] for m in native] == ["user", "assistant", "user", "assistant", "user"]
    assert native[2]["content"] == [{"text": "Find x."}, {"text": "Quickly."}]
    assert native[3]["content"] == [{"toolUse": {"toolUseId": "t1", "name": "lookup", "input": {"q": "x"}}}]
    assert native[4]["content"] == [{"toolResult": {"toolUseId": "t1", "content": [{"text": "plain text"}]}}]
    as_text = converse_messages(turns, native_tools=False)  # no toolConfig this round: no tool blocks allowed
    assert as_text[3]["content"] == [{"text": '[called lookup({"q": "x"})]'}]
    assert as_text[4]["content"] == [{"text": "[lookup returned: plain text]"}]


@pytest.mark.parametrize("code,status_code,expected", [
    ("UnrecognizedClientException", 403, Status.UNAUTHENTICATED), ("InvalidSignatureException", 403, Status.UNAUTHENTICATED),
    ("AccessDeniedException", 403, Status.PERMISSION_DENIED), ("ThrottlingException", 429, Status.RESOURCE_EXHAUSTED),
    ("ServiceQuotaExceededException", 400, Status.RESOURCE_EXHAUSTED), ("ResourceNotFoundException", 404, Status.NOT_FOUND),
    ("ValidationException", 400, Status.INVALID_ARGUMENT), ("ModelNotReadyException", 429, Status.UNAVAILABLE),
    ("ServiceUnavailableException", 503, Status.UNAVAILABLE), ("InternalServerException", 500, Status.UNAVAILABLE),
    ("ModelTimeoutException", 408, Status.DEADLINE_EXCEEDED), ("SomethingNewException", 502, Status.UNAVAILABLE),
    ("modelStreamErrorException", 200, Status.UNAVAILABLE),
])
def test_error_table(code, status_code, expected):
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status_code}}
    err = ClientError(response, "ConverseStream")
    mapped = bedrock_error(err, "model m")
    assert mapped.code == expected and mapped.message.startswith("bedrock: ") and code in mapped.message


def _self_signed(tmp_path) -> tuple[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


async def test_api_key_file_is_sent_as_a_bearer_token(tmp_path, monkeypatch):
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    for name, value in DUMMY_AWS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CA_BUNDLE", cert)
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK", raising=False)
    key_file = tmp_path / "api-key"
    key_file.write_text("bedrock-api-key-for-tests\n")
    with FakeBedrock(ssl_context=context) as tls_fake:
        provider = BedrockLlmProvider(BedrockSettings(endpoint=tls_fake.endpoint, api_key_file=str(key_file)))
        try:
            await provider.load()
            assert await provider.probe() is None
            events = [e async for e in provider.stream([ChatTurn("user", "hi")], [], GenerationParams())]
        finally:
            os.environ.pop("AWS_BEARER_TOKEN_BEDROCK", None)  # load() set it for this process (not via monkeypatch)
            await provider.close()
        auth = tls_fake.seen("auth")
    assert isinstance(events[-1], RoundEnd) and isinstance(events[0], TextDelta)
    assert {a["scheme"] for a in auth} == {"Bearer"}
    assert "bedrock-api-key-for-tests" not in repr(provider.info())
    assert provider.info().details["credentials"] == f"Bedrock API key ({key_file})"


def test_api_key_needs_https(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "k")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(SystemExit, match="only sent over https"):
        BedrockLlmProvider(BedrockSettings(endpoint="http://127.0.0.1:1"))._make_clients()


async def test_closing_the_generator_closes_the_upstream(fake, monkeypatch):
    for name, value in DUMMY_AWS.items():
        monkeypatch.setenv(name, value)
    fake.backend = backend = Gated()
    provider = BedrockLlmProvider(BedrockSettings(endpoint=fake.endpoint))
    await provider.load()
    tools = [ToolSpec("get_weather", "", {})]
    events = provider.stream([ChatTurn("user", "An in-process story.")], tools, GenerationParams())
    try:
        assert await anext(events) == TextDelta("Once upon a time")
        await events.aclose()
        fake.wait_for("cancelled", timeout=WAIT_S, where=lambda seen: seen["prompt"] == "An in-process story.")
    finally:
        backend.release()
        await provider.close()


def test_out_of_range_sampling_is_invalid_before_any_request(stub, fake):
    before = len(fake.seen("request"))
    _, status, details = generate(stub, chat(temperature=1.5))  # Converse takes 0-1: refused before sending
    assert status == Status.INVALID_ARGUMENT and "temperature" in details and details.startswith("bedrock: "), details
    assert len(fake.seen("request")) == before


@pytest.mark.parametrize("model,reason", [("us.amazon.nova-lite-v1:0", None), ("amazon.nova-lite-v1:0", None),
                                          ("us.amazon.nope-v1:0", "ResourceNotFoundException"),
                                          ("amazon.nope-v1:0", "ResourceNotFoundException")])
async def test_probe_looks_up_models_and_inference_profiles(fake, monkeypatch, model, reason):
    for name, value in DUMMY_AWS.items():
        monkeypatch.setenv(name, value)
    provider = BedrockLlmProvider(BedrockSettings(endpoint=fake.endpoint, model=model))
    await provider.load()
    try:
        result = await provider.probe()
    finally:
        await provider.close()
    assert (result is None) if reason is None else (reason in result and model in result), result
    assert fake.seen("probe")[-1] == model


async def test_probe_passes_on_access_denied(fake, monkeypatch):
    """A role allowed to invoke but not to read model details is still healthy: the signature was accepted."""
    for name, value in DUMMY_AWS.items():
        monkeypatch.setenv(name, value)
    fake.fail_probe_next = ("AccessDeniedException", "User is not authorized to perform: bedrock:GetFoundationModel")
    provider = BedrockLlmProvider(BedrockSettings(endpoint=fake.endpoint))
    await provider.load()
    try:
        assert await provider.probe() is None
    finally:
        await provider.close()


def test_tool_input_that_is_not_json_is_a_clear_error(stub, fake):
    cut_short = ToolCallPart("tooluse_bad", "get_weather", '{"city": "Par')
    fake.backend = ScriptedChat(rounds=[[cut_short, Finish("tool_calls", 5, 5)]])
    responses, status, details = generate(stub, chat("Weather?", tools=[WEATHER]))
    assert not any(r.HasField("tool_call") for r in responses)
    assert status == Status.INTERNAL and "get_weather" in details and "not valid JSON" in details, details
