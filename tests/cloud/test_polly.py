"""Amazon Polly (`--provider polly`): the real TTS service process, the real provider code and
boto3, against a fake Polly REST endpoint (tests/cloud/fakes/polly.py) that verifies each
request's SigV4 signature with botocore."""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.conftest import DUMMY_AWS
from cloud.fakes.polly import FakePolly
from voicemesh.runtime.errors import InvalidInput, NotFound, ResourceExhausted, Unauthenticated, Unavailable
from voicemesh.v1 import common_pb2, tts_pb2, tts_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
WAIT_S = 60.0  # liveness bound for a wait; never a speed claim
S = tts_pb2.SynthesizeRequest
SECRET = DUMMY_AWS["AWS_SECRET_ACCESS_KEY"]


def fmt(rate: int = 16000) -> common_pb2.AudioFormat:
    return common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=rate, channels=1)


@pytest.fixture(scope="module")
def fake():
    with FakePolly() as running:
        yield running


@pytest.fixture(scope="module")
def service(provider_services, fake):
    """Word marks on, botocore's default 3 attempts; a read timeout longer than any wait here, so
    only the provider's cancel (never a timeout) can end a held synthesis within one."""
    env = {**fake.service_env(), "VOICEMESH_TTS_POLLY_WORD_MARKS": "true", "VOICEMESH_TTS_POLLY_READ_TIMEOUT_S": "300"}
    return provider_services.start("tts", "polly", env, extra=["--probe-seconds", "0.5"])


@pytest.fixture(scope="module")
def strict(provider_services, fake):
    """One attempt per request, no word marks: each failure the fake is told of reaches the caller.
    At log level DEBUG, so the log test shows that botocore still logs nothing signed."""
    return provider_services.start("tts", "polly", {**fake.service_env(), "VOICEMESH_TTS_POLLY_MAX_ATTEMPTS": "1"},
                                   name="tts-polly-strict", extra=["--probe-seconds", "5", "--log-level", "DEBUG"])


def stub_of(service):
    channel = grpc.insecure_channel(service.address)
    return channel, tts_pb2_grpc.TtsServiceStub(channel)


@pytest.fixture(scope="module")
def stub(service):
    channel, stub = stub_of(service)
    yield stub
    channel.close()


@pytest.fixture(scope="module")
def strict_stub(strict):
    channel, stub = stub_of(strict)
    yield stub
    channel.close()


def speak(stub, text: str, **config) -> tuple[list, grpc.StatusCode, str]:
    config.setdefault("format", fmt())
    requests = [S(config=tts_pb2.TtsConfig(**config)), S(text=tts_pb2.TextPiece(segment_id=1, text=text, end_of_segment=True))]
    responses = []
    try:
        for response in stub.Synthesize(iter(requests), timeout=WAIT_S):
            responses.append(response)
    except grpc.RpcError as err:
        return responses, err.code(), err.details()
    return responses, grpc.StatusCode.OK, ""


def wait_health(address: str, want: int, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                seen = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            except grpc.RpcError as err:
                seen = err.code()
            if seen == want:
                return
            time.sleep(0.1)  # polling a state with a deadline
    raise AssertionError(f"health of {address} never became {want}; last {seen}")


# --- streaming ---------------------------------------------------------------------------------
def test_audio_arrives_while_polly_is_still_sending(stub, fake):
    before = len(fake.seen("done"))
    fake.release.clear()
    fake.hold_after = 2  # the fake stops after two chunks until the test has heard audio
    try:
        call = stub.Synthesize(iter([S(config=tts_pb2.TtsConfig(format=fmt())),
                                     S(text=tts_pb2.TextPiece(segment_id=1, text="Hello there, how are you today?",
                                                              end_of_segment=True))]), timeout=WAIT_S)
        responses = iter(call)
        first = next(r for r in responses if r.HasField("audio"))
        assert len(fake.seen("done")) == before, "the first audio came only after Polly had finished"
        fake.release.set()
        rest = list(responses)
    finally:
        fake.hold_after = 0
        fake.release.set()
    audio = [first.audio.chunk.data] + [r.audio.chunk.data for r in rest if r.HasField("audio")]
    done = [r.segment_done for r in rest if r.HasField("segment_done")]
    assert sum(map(len, audio)) == fake.seen("done")[-1]  # 16 kHz asked and given: every byte arrives
    assert done and done[0].spoken_text == "Hello there, how are you today?"
    assert [w.text for w in done[0].words] == ["Hello", "there", "how", "are", "you", "today"]  # speech marks
    assert [w.start_ms for w in done[0].words] == sorted(w.start_ms for w in done[0].words) and done[0].words[-1].start_ms > 0
    body = [b for b in fake.seen("request") if b["OutputFormat"] == "pcm"][-1]
    assert (body["VoiceId"], body["Engine"], body["SampleRate"], body["Text"]) == (
        "Joanna", "neural", "16000", "Hello there, how are you today?")
    marks = [b for b in fake.seen("request") if b["OutputFormat"] == "json"][-1]
    assert marks["SpeechMarkTypes"] == ["word"] and "SampleRate" not in marks
    scopes = set(fake.seen("auth"))
    assert scopes and all(s.startswith(f"{DUMMY_AWS['AWS_ACCESS_KEY_ID']}/") and s.endswith("/us-east-1/polly/aws4_request")
                          for s in scopes), scopes


def test_cancel_closes_the_audio_stream(stub, fake):
    before = len(fake.seen("cancelled"))
    fake.release.clear()
    fake.hold_after = 2
    try:
        call = stub.Synthesize(iter([S(config=tts_pb2.TtsConfig(format=fmt())),
                                     S(text=tts_pb2.TextPiece(segment_id=1, text="A long sentence that is never finished " * 3,
                                                              end_of_segment=True))]), timeout=WAIT_S)
        next(r for r in call if r.HasField("audio"))
        call.cancel()
        fake.wait_for("cancelled", count=before + 1)  # the fake saw the connection closed mid-synthesis
    finally:
        fake.hold_after = 0
        fake.release.set()


def test_caller_rate_speed_and_bilingual_voice(stub, fake):
    responses, code, details = speak(stub, "Namaste, how are you?", format=fmt(24000), voice="Kajal", language="hi-IN",
                                     speed=1.5)
    assert code == grpc.StatusCode.OK, details
    assert sum(len(r.audio.chunk.data) for r in responses if r.HasField("audio")) > 0
    body = [b for b in fake.seen("request") if b["OutputFormat"] == "pcm"][-1]
    assert body["SampleRate"] == "16000" and body["VoiceId"] == "Kajal" and body["LanguageCode"] == "hi-IN"
    assert body["TextType"] == "ssml" and '<prosody rate="150%">' in body["Text"]


def test_opening_is_retried_by_botocore(stub, fake):
    before = len(fake.seen("refused"))
    fake.fail_next("throttle")
    _, code, details = speak(stub, "Retry me.")
    assert code == grpc.StatusCode.OK, details
    assert fake.seen("refused")[before:] == ["ThrottlingException"]


# --- errors ---------------------------------------------------------------------------------------
ERRORS = {
    "auth": (grpc.StatusCode.UNAUTHENTICATED, "UnrecognizedClientException"),
    "throttle": (grpc.StatusCode.RESOURCE_EXHAUSTED, "ThrottlingException"),
    "not_found": (grpc.StatusCode.NOT_FOUND, "voice 'Joanna' does not exist"),
    "bad_format": (grpc.StatusCode.INVALID_ARGUMENT, "InvalidSampleRateException"),
    "unavailable": (grpc.StatusCode.UNAVAILABLE, "ServiceFailureException"),
}


@pytest.mark.parametrize("error_class", sorted(ERRORS))
def test_error_classes(strict_stub, fake, error_class):
    fake.fail_next(error_class)
    _, code, details = speak(strict_stub, "This fails.")
    status, text = ERRORS[error_class]
    assert (code, text in details, details.startswith("polly:")) == (status, True, True), details


@pytest.mark.parametrize("config, message", [
    ({"voice": "Nobody"}, "unknown voice 'Nobody'; available: Amy, Joanna, Kajal, Lea, Matthew"),
    ({"voice": "Aditi"}, "unknown voice 'Aditi'"),  # a standard-engine voice: not offered for neural
    ({"language": "fr-FR"}, "polly: voice 'Joanna' speaks en-US, not 'fr-FR'"),
    ({"speed": 3.0}, "outside 0.5-2.0"),
    ({"format": common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=96000, channels=1)},
     "outside 8000-48000"),
])
def test_bad_input(strict_stub, config, message):
    _, code, details = speak(strict_stub, "Hello.", **config)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details


# --- health, info, logs ----------------------------------------------------------------------------
def test_health_follows_polly(provider_services):
    with FakePolly() as own:
        service = provider_services.start("tts", "polly", own.service_env(), name="tts-polly-health",
                                          extra=["--probe-seconds", "0.3"])
        own.reject_credentials = True
        wait_health(service.address, NOT_SERVING)
        own.reject_credentials = False
        wait_health(service.address, SERVING)
        own.go_away()
        wait_health(service.address, NOT_SERVING)
        own.come_back()
        wait_health(service.address, SERVING)
        log = service.log()
        assert "polly: UnrecognizedClientException" in log and "polly: cannot reach Polly" in log
        provider_services.stop(service)


def test_missing_default_voice_is_not_serving(provider_services, fake):
    service = provider_services.start("tts", "polly", {**fake.service_env(), "VOICEMESH_TTS_POLLY_VOICE": "Nobody"},
                                      name="tts-polly-novoice", wait=False)
    try:
        wait_health(service.address, NOT_SERVING)
        deadline = time.monotonic() + WAIT_S
        while "voice 'Nobody' does not exist" not in service.log() and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the log with a deadline
        assert "voice 'Nobody' does not exist for engine neural in us-east-1; available: Amy, Joanna" in service.log()
    finally:
        provider_services.stop(service)


def test_info_and_logs_hold_no_secret(stub, service, strict, fake):
    reply = stub.Info(tts_pb2.TtsServiceInfoRequest(), timeout=10)
    info = reply.info
    assert info.provider == "polly" and info.model == "polly-neural"
    assert info.details["voice"] == "Joanna" and info.details["region"] == "us-east-1"
    assert info.details["endpoint"] == fake.endpoint and info.details["output"] == "pcm 16000 Hz"
    assert list(reply.voices) == ["Amy", "Joanna", "Kajal", "Lea", "Matthew"]
    assert SECRET not in str(reply)
    for log in (service.log(), strict.log()):
        assert SECRET not in log and "Signature=" not in log and "Authorization" not in log
    assert " DEBUG " in strict.log()  # the strict service does log at DEBUG, just not botocore's


# --- in-process units ----------------------------------------------------------------------------
def _client_error(code: str, status: int, message: str = "m"):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "SynthesizeSpeech")


@pytest.mark.parametrize("code, status, expected", [
    ("InvalidSignatureException", 403, Unauthenticated), ("ThrottlingException", 400, ResourceExhausted),
    ("TextLengthExceededException", 400, InvalidInput), ("EngineNotSupportedException", 400, InvalidInput),
    ("LexiconNotFoundException", 404, NotFound), ("ServiceFailureException", 500, Unavailable),
    ("SomethingNew", 503, Unavailable),
])
def test_error_mapping(code, status, expected):
    from voicemesh.tts.providers.polly import polly_error

    error = polly_error(_client_error(code, status), voice="Joanna")
    assert isinstance(error, expected) and error.message.startswith("polly:")


def test_rejects_rates_polly_cannot_give():
    from voicemesh.tts.providers.polly import PollySettings, PollyTtsProvider

    with pytest.raises(SystemExit, match="8000 or 16000"):
        PollyTtsProvider(PollySettings(sample_rate=22050))
