"""Amazon Transcribe streaming (`--provider aws`): the real STT service process, the real provider
code, against a fake Transcribe WebSocket endpoint (tests/cloud/fakes/aws_transcribe.py) that
verifies the SigV4 presigned URL with botocore, as AWS does."""
from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.conftest import DUMMY_AWS
from cloud.fakes.aws_transcribe import FakeTranscribe, check_query_signature
from cloud.fakes.backends import ScriptedStt
from support import tone
from voicemesh.runtime.errors import InvalidInput, NotFound, ResourceExhausted, Unauthenticated, Unavailable
from voicemesh.stt.providers import aws_eventstream
from voicemesh.v1 import common_pb2, stt_pb2, stt_pb2_grpc

TEXT = "Paris is the capital of France."
PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
R = stt_pb2.RecognizeRequest
WAIT_S = 60.0  # liveness bound for a wait; never a speed claim


@pytest.fixture(scope="module")
def fake():
    with FakeTranscribe(backend=ScriptedStt(TEXT)) as running:
        yield running


@pytest.fixture(scope="module")
def service(provider_services, fake):
    return provider_services.start("stt", "aws", fake.service_env(), extra=["--probe-seconds", "0.5"])


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(service.address) as channel:
        yield stt_pb2_grpc.SttServiceStub(channel)


def utterance(seconds: float = 1.0, language: str = "en-US", finalize: bool = True, chunk_ms: int = 40):
    """Config, a turn, `seconds` of tone and (if `finalize`) a finalize, as a request list."""
    requests = [R(config=stt_pb2.SttConfig(format=PCM16_16K, language=language, interim_results=True)),
                R(turn_start=common_pb2.TurnContext(turn_id="t1", audio_offset_ms=0))]
    samples = tone(seconds)
    step = 16 * chunk_ms
    requests += [R(audio=common_pb2.AudioChunk(data=samples[i:i + step].tobytes())) for i in range(0, len(samples), step)]
    return requests + [R(finalize=stt_pb2.Finalize(turn_id="t1"))] if finalize else requests


def held(requests, release: threading.Event):
    """The requests, then the stream stays open until `release` (a caller that keeps its
    microphone open: no end of requests, whose own finalize would start another utterance)."""
    yield from requests
    release.wait(WAIT_S)


def recognize(stub, requests) -> tuple[list, grpc.StatusCode, str]:
    """Responses up to the first end of utterance, then the call is cancelled; or the error."""
    responses = []
    release = threading.Event()
    call = stub.Recognize(held(requests, release), timeout=WAIT_S)
    try:
        for response in call:
            responses.append(response)
            if response.HasField("end_of_utterance"):
                call.cancel()
                return responses, grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return responses, err.code(), err.details()
    finally:
        release.set()
    return responses, grpc.StatusCode.OK, ""


def wait_health(address: str, want: int, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                seen = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            except grpc.RpcError as err:
                seen = err.code()
            if seen == want:
                return
            time.sleep(0.1)  # polling a state with a deadline
    raise AssertionError(f"health of {address} never became {want}; last {seen}")


# --- streaming ---------------------------------------------------------------------------------
def test_interims_then_final_with_words(stub, fake):
    before = len(fake.seen("request"))
    responses, code, details = recognize(stub, utterance(1.2))
    assert code == grpc.StatusCode.OK, details
    transcripts = [r.transcript for r in responses if r.HasField("transcript")]
    interims = [t for t in transcripts if not t.is_final]
    finals = [t for t in transcripts if t.is_final]
    assert interims and interims[0].text == "Paris", transcripts
    assert transcripts.index(interims[0]) < transcripts.index(finals[0])
    assert len(finals) == 1 and finals[0].text == TEXT
    words = finals[0].words
    assert [w.text for w in words] == ["Paris", "is", "the", "capital", "of", "France."]  # punctuation joined to its word
    assert all(w.end_ms > w.start_ms >= 0 for w in words) and words[-1].end_ms <= 1250
    assert [w.start_ms for w in words] == sorted(w.start_ms for w in words)
    assert all(abs(w.confidence - 0.9) < 1e-6 for w in words) and abs(finals[0].confidence - 0.9) < 1e-6
    assert responses[-1].end_of_utterance.turn_id == "t1"
    request = fake.seen("request")[before]
    assert request["language-code"] == "en-US" and request["media-encoding"] == "pcm" and request["sample-rate"] == "16000"
    scope = request["X-Amz-Credential"]
    assert scope.startswith(f"{DUMMY_AWS['AWS_ACCESS_KEY_ID']}/") and scope.endswith("/us-east-1/transcribe/aws4_request")
    assert request["X-Amz-Expires"] == "300"
    fake.wait_for("closed", count=1)
    sizes = [len(chunk) for chunk in fake.seen("audio")]
    assert all(1600 <= size <= 6400 for size in sizes[:-1]), sizes  # 50-200 ms per AudioEvent
    assert sum(sizes) >= 1.2 * 32000 * 0.99


def test_cancel_closes_the_websocket(stub, fake):
    before_audio, before_cancel = len(fake.seen("audio")), len(fake.seen("cancelled"))
    release = threading.Event()
    call = stub.Recognize(held(utterance(2.0, finalize=False), release), timeout=WAIT_S)
    try:
        fake.wait_for("audio", count=before_audio + 5)
        call.cancel()
        fake.wait_for("cancelled", count=before_cancel + 1)
    finally:
        release.set()
    assert call.code() == grpc.StatusCode.CANCELLED


# --- errors ---------------------------------------------------------------------------------------
ERRORS = {
    "auth": (grpc.StatusCode.UNAUTHENTICATED, "UnrecognizedClientException"),
    "throttle": (grpc.StatusCode.RESOURCE_EXHAUSTED, "LimitExceededException"),
    "not_found": (grpc.StatusCode.NOT_FOUND, "vocabulary"),
    "bad_format": (grpc.StatusCode.INVALID_ARGUMENT, "BadRequestException"),
}


@pytest.mark.parametrize("error_class", sorted(ERRORS))
def test_error_classes(stub, fake, error_class):
    fake.fail_next(error_class)
    _, code, details = recognize(stub, utterance(0.4))
    status, text = ERRORS[error_class]
    assert (code, text in details, details.startswith("aws transcribe:")) == (status, True, True), details


def test_unavailable_retried_then_reported(stub, fake):
    before = len(fake.seen("request"))
    fake.fail_next("unavailable")
    _, code, details = recognize(stub, utterance(0.4))
    assert code == grpc.StatusCode.OK, details  # the handshake is retried: nothing had been sent yet
    assert len(fake.seen("request")) - before == 2
    for _ in range(3):
        fake.fail_next("unavailable")
    _, code, details = recognize(stub, utterance(0.4))
    assert code == grpc.StatusCode.UNAVAILABLE and details.startswith("aws transcribe: ServiceUnavailableException"), details


def test_unsupported_language(stub, fake):
    _, code, details = recognize(stub, utterance(0.4, language="xx-XX"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "xx-XX" in details and "aws transcribe" in details, details


def test_bare_language_gets_the_configured_region(stub, fake):
    before = len(fake.seen("request"))
    _, code, details = recognize(stub, utterance(0.4, language="en"))
    assert code == grpc.StatusCode.OK, details
    assert fake.seen("request")[before]["language-code"] == "en-US"


@pytest.mark.parametrize("requests, message", [
    ([R(config=stt_pb2.SttConfig(format=common_pb2.AudioFormat(encoding=9, sample_rate_hz=16000, channels=1)))],
     "unsupported encoding"),
    ([R(config=stt_pb2.SttConfig(format=PCM16_16K)), R(audio=common_pb2.AudioChunk(data=b"\x00" * 321))], "whole number"),
])
def test_service_bad_input(stub, requests, message):
    _, code, details = recognize(stub, requests)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details


# --- wrong secret, health, info, logs ---------------------------------------------------------
def test_wrong_secret_is_refused_and_not_serving(provider_services, fake):
    wrong = "wrong-secret-do-not-log"
    service = provider_services.start("stt", "aws", {**fake.service_env(), "AWS_SECRET_ACCESS_KEY": wrong}, name="stt-aws-wrong",
                                      wait=False, extra=["--probe-seconds", "0.5", "--log-level", "DEBUG"])
    try:
        deadline = time.monotonic() + WAIT_S
        while "not serving: aws transcribe: STS refused the credentials" not in service.log():
            assert time.monotonic() < deadline and service.proc.poll() is None, service.log()[-3000:]
            time.sleep(0.1)  # polling the log with a deadline (health is NOT_SERVING while loading too)
        wait_health(service.address, NOT_SERVING)
        with grpc.insecure_channel(service.address) as channel:
            _, code, details = recognize(stt_pb2_grpc.SttServiceStub(channel), utterance(0.3))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "InvalidSignatureException" in details, details
        log = service.log()
        assert wrong not in log
        assert "X-Amz-Signature" not in log and "Signature=" not in log  # at DEBUG too
    finally:
        provider_services.stop(service)


def test_health_follows_the_provider(provider_services):
    with FakeTranscribe() as own:
        service = provider_services.start("stt", "aws", own.service_env(), name="stt-aws-health",
                                          extra=["--probe-seconds", "0.3"])
        own.reject_credentials = True
        wait_health(service.address, NOT_SERVING)
        own.reject_credentials = False
        wait_health(service.address, SERVING)
        own.go_away()
        wait_health(service.address, NOT_SERVING)
        own.come_back()
        wait_health(service.address, SERVING)
        assert "aws transcribe: cannot connect to" in service.log()
        provider_services.stop(service)


def test_info_has_no_secret(stub, service, fake):
    info = stub.Info(stt_pb2.SttServiceInfoRequest(), timeout=10).info
    assert info.provider == "aws" and info.model == "amazon-transcribe-streaming"
    assert info.details["region"] == "us-east-1" and info.details["endpoint"] == fake.endpoint
    assert info.details["language"] == "en-US"
    assert DUMMY_AWS["AWS_SECRET_ACCESS_KEY"] not in str(info)
    log = service.log()
    assert DUMMY_AWS["AWS_SECRET_ACCESS_KEY"] not in log and "X-Amz-Signature" not in log


# --- in-process units ----------------------------------------------------------------------------
def test_transcript_event_mapping():
    from voicemesh.stt.providers.aws_transcribe import transcripts

    payload = {"Transcript": {"Results": [{"IsPartial": False, "StartTime": 0.5, "EndTime": 1.25, "Alternatives": [{
        "Transcript": "Hi, there.", "Items": [
            {"Type": "pronunciation", "Content": "Hi", "StartTime": 0.5, "EndTime": 0.75, "Confidence": 0.8},
            {"Type": "punctuation", "Content": ",", "StartTime": 0.75, "EndTime": 0.75},
            {"Type": "pronunciation", "Content": "there", "StartTime": 0.8, "EndTime": 1.25, "Confidence": 1.0},
            {"Type": "punctuation", "Content": ".", "StartTime": 1.25, "EndTime": 1.25}]}]}]}}
    [result] = transcripts(json.dumps(payload).encode(), "en-US")
    assert result.is_final and result.text == "Hi, there." and (result.start_ms, result.end_ms) == (500, 1250)
    assert [(w.text, w.start_ms, w.end_ms) for w in result.words] == [("Hi,", 500, 750), ("there.", 800, 1250)]
    assert abs(result.confidence - 0.9) < 1e-9 and result.language == "en-US"


def test_exception_mapping():
    from voicemesh.stt.providers.aws_transcribe import exception_error

    assert isinstance(exception_error("BadRequestException", "The language code xx isn't supported", "xx"), InvalidInput)
    assert isinstance(exception_error("BadRequestException", "The requested vocabulary couldn't be found.", "en-US"), NotFound)
    assert isinstance(exception_error("LimitExceededException", "too many", "en-US"), ResourceExhausted)
    assert isinstance(exception_error("ThrottlingException", "slow down", "en-US"), ResourceExhausted)
    assert isinstance(exception_error("UnrecognizedClientException", "bad key", "en-US"), Unauthenticated)
    assert isinstance(exception_error("ServiceUnavailableException", "later", "en-US"), Unavailable)


def test_presigned_url_verifies_only_with_the_right_secret(monkeypatch):
    import asyncio
    from urllib.parse import parse_qsl, urlsplit

    from voicemesh.stt.providers.aws_transcribe import TranscribeSettings, TranscribeSttProvider

    for name, value in DUMMY_AWS.items():
        monkeypatch.setenv(name, value)
    provider = TranscribeSttProvider(TranscribeSettings(endpoint="wss://transcribe.example:8443", vocabulary="my words"))
    url = urlsplit(asyncio.run(provider.presigned_url("en-GB")))
    assert url.scheme == "wss" and url.path == "/stream-transcription-websocket"
    query = parse_qsl(url.query, keep_blank_values=True)
    assert dict(query)["vocabulary-name"] == "my words"
    args = (url.netloc, url.path, query, DUMMY_AWS["AWS_ACCESS_KEY_ID"])
    assert check_query_signature(*args, DUMMY_AWS["AWS_SECRET_ACCESS_KEY"], "us-east-1", "transcribe") is None
    assert check_query_signature(*args, "another-secret", "us-east-1", "transcribe")[0] == "InvalidSignatureException"


def test_empty_audio_event_is_the_end_marker():
    from botocore.eventstream import EventStreamBuffer

    buffer = EventStreamBuffer()
    buffer.add_data(aws_eventstream.event("AudioEvent", b""))
    [message] = list(buffer)
    assert message.headers[":event-type"] == "AudioEvent" and message.payload == b""
