"""The Cartesia TTS provider, through the real TTS service process (`voicemesh-serve tts
--provider cartesia`), against a fake Cartesia on 127.0.0.1 speaking its WebSocket API."""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.fakes.cartesia import API_KEY, FakeCartesia
from voicemesh.runtime.errors import InvalidInput
from voicemesh.tts.providers.cartesia import speed_fields
from voicemesh.v1 import common_pb2, tts_pb2, tts_pb2_grpc

PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
MULAW_8K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000, channels=1)
DEFAULT_VOICE = "a0e99841-438c-4a64-b679-ae501e7d6091"
OTHER_VOICE = "694f9389-aac1-45b6-b726-9d9369183238"
TEXT = "Hello there friend."
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def fake():
    with FakeCartesia() as running:
        yield running


@pytest.fixture(scope="module")
def service(provider_services, fake):
    return provider_services.start("tts", "cartesia", fake.env(), extra=["--probe-seconds", "0.3"])


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(service.address) as channel:
        yield tts_pb2_grpc.TtsServiceStub(channel)


@pytest.fixture(autouse=True)
def _reset(fake):
    yield
    fake.hold(None)
    fake.release()
    fake.outage = None
    fake.error_after = None
    while fake.take_failure():
        pass


def _requests(text=TEXT, fmt=PCM16_16K, **config):
    return iter([tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(format=fmt, **config)),
                 tts_pb2.SynthesizeRequest(text=tts_pb2.TextPiece(segment_id=1, text=text, end_of_segment=True))])


def _status(stub, requests) -> tuple[grpc.StatusCode, str]:
    try:
        for _ in stub.Synthesize(requests, timeout=60):
            pass
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def _wait_health(address: str, want: int, timeout: float = 30.0) -> None:
    deadline, seen = time.monotonic() + timeout, None
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                seen = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            except grpc.RpcError as err:
                seen = err.code()
            if seen == want:
                return
            time.sleep(0.1)  # polling a state, with a deadline
    raise AssertionError(f"health stayed {seen}, wanted {health_pb2.HealthCheckResponse.ServingStatus.Name(want)}")


def _wait_log(service, text: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in (log := service.log()):
            return log
        if service.proc.poll() is not None:
            break
        time.sleep(0.1)  # polling a state, with a deadline
    raise AssertionError(f"{text!r} not in the log of {service.address}:\n{service.log()}")


def test_streams_audio_before_the_synthesis_ends_with_words(stub, fake):
    fake.hold(2)  # the fake sends two chunks, then waits: audio must reach the caller meanwhile
    done_before = len(fake.seen("done"))
    call = stub.Synthesize(_requests(), timeout=60)
    first = next(call)
    assert first.HasField("audio") and first.audio.chunk.data
    assert len(fake.seen("done")) == done_before, "the first audio came only after the synthesis ended"
    fake.release()
    rest = list(call)
    audio = first.audio.chunk.data + b"".join(r.audio.chunk.data for r in rest if r.HasField("audio"))
    done = [r.segment_done for r in rest if r.HasField("segment_done")]
    assert len(done) == 1 and done[0].spoken_text == TEXT
    assert [(w.text, w.start_ms) for w in done[0].words] == [("Hello", 0), ("there", 120), ("friend.", 240)]
    assert abs(len(audio) / 32 - 380) <= 20, len(audio)  # 19 chars x 20 ms, resampled 24 -> 16 kHz
    request = fake.seen("request")[-1]
    assert {k: request[k] for k in ("text", "voice", "model", "format", "language", "continue")} == {
        "text": TEXT, "voice": DEFAULT_VOICE, "model": "sonic-2", "language": "en", "continue": False,
        "format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000}}
    assert fake.seen("auth")[-1] == API_KEY


def test_sentences_share_one_pooled_connection(stub, fake):
    requests, connections = len(fake.seen("request")), len(fake.seen("connection"))
    status, details = _status(stub, _requests("The first sentence is here. The second one follows it. And a third."))
    assert status == grpc.StatusCode.OK, details
    contexts = [r["context"] for r in fake.seen("request")[requests:]]
    assert len(contexts) == 3 and len(set(contexts)) == 3  # one context per sentence
    assert len(fake.seen("connection")) - connections <= 1  # ... on one socket (new, or pooled from before)


def test_a_pooled_connection_closed_by_the_server_is_replaced(stub, fake):
    assert _status(stub, _requests()) == (grpc.StatusCode.OK, "")  # leaves a socket in the pool
    connections, requests = len(fake.seen("connection")), len(fake.seen("request"))
    fake.drop_connections()
    status, details = _status(stub, _requests())
    assert status == grpc.StatusCode.OK, details
    assert len(fake.seen("connection")) == connections + 1
    assert len(fake.seen("request")) == requests + 1  # the dead socket carried nothing; no retry was spent


def test_mulaw_8k_voice_language_and_speed_reach_cartesia(stub, fake):
    status, details = _status(stub, _requests(fmt=MULAW_8K, voice=OTHER_VOICE, language="de-DE", speed=1.5))
    assert status == grpc.StatusCode.OK, details
    request = fake.seen("request")[-1]
    assert (request["voice"], request["language"], request["controls"]) == (OTHER_VOICE, "de", {"speed": 0.5})


def test_cancel_sends_a_context_cancel_and_closes_the_socket(stub, fake):
    fake.hold(2)
    call = stub.Synthesize(_requests("Cancel me before the end of it."), timeout=60)
    assert next(call).HasField("audio")
    context = fake.seen("request")[-1]["context"]
    call.cancel()
    assert fake.wait_for("cancelled", where=lambda seen: seen == context)
    fake.wait_for("closed", where=lambda seen: context not in seen["active"])
    assert context not in fake.seen("done")


def test_an_error_after_audio_ends_the_stream_without_a_retry(stub, fake):
    fake.error_after = 2
    requests = len(fake.seen("request"))
    call = stub.Synthesize(_requests("This one fails half way through."), timeout=60)
    got_audio = False
    with pytest.raises(grpc.RpcError) as err:
        for response in call:
            got_audio = got_audio or response.HasField("audio")
    assert got_audio and err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert err.value.details().startswith("cartesia: Internal server error"), err.value.details()
    assert len(fake.seen("request")) - requests == 1  # audio had gone out: never retried mid-stream


@pytest.mark.parametrize("error_class, code, words", [
    ("auth", grpc.StatusCode.UNAUTHENTICATED, "Invalid API key"),
    ("throttle", grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrency limit exceeded"),
    ("not_found", grpc.StatusCode.NOT_FOUND, "Voice not found"),
    ("bad_format", grpc.StatusCode.INVALID_ARGUMENT, "Invalid output format"),
    ("unavailable", grpc.StatusCode.UNAVAILABLE, "Internal server error"),
])
def test_errors_map_to_a_status_naming_cartesia(stub, fake, error_class, code, words):
    for _ in range(3):  # transient classes are retried (3 attempts, before any audio); the rest fail at once
        fake.fail_next(error_class)
    status, details = _status(stub, _requests())
    assert status == code, details
    assert details.startswith("cartesia:") and words in details, details


def test_one_transient_failure_is_retried(stub, fake):
    requests = len(fake.seen("request"))
    fake.fail_next("throttle")
    status, details = _status(stub, _requests())
    assert status == grpc.StatusCode.OK, details
    assert len(fake.seen("request")) - requests == 2


@pytest.mark.parametrize("config, words", [
    ({"voice": "no-such-voice"}, f"unknown voice 'no-such-voice'; available: {OTHER_VOICE}, {DEFAULT_VOICE}"),
    ({"language": "xx"}, "cartesia: Unsupported language: xx"),
    ({"speed": 3.0}, "speed 3.0 is outside 0.5-2.0"),
])
def test_bad_input(stub, config, words):
    status, details = _status(stub, _requests(**config))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and words in details, details


def test_info_names_provider_model_voice_and_no_secret(stub, fake):
    info = stub.Info(tts_pb2.TtsServiceInfoRequest(), timeout=10)
    assert (info.info.provider, info.info.model) == ("cartesia", "sonic-2")
    assert info.info.details["voice"] == DEFAULT_VOICE and info.info.details["endpoint"] == fake.endpoint
    assert info.info.details["api_version"] == "2024-11-13"
    assert list(info.voices) == [OTHER_VOICE, DEFAULT_VOICE]
    assert API_KEY not in str(info)


def test_health_follows_the_probe(service, fake):
    _wait_health(service.address, SERVING)
    fake.outage = "auth"
    _wait_health(service.address, NOT_SERVING)
    fake.outage = None
    _wait_health(service.address, SERVING)
    fake.outage = "unavailable"
    _wait_health(service.address, NOT_SERVING)
    fake.outage = None
    _wait_health(service.address, SERVING)
    log = service.log()
    assert "provider unreachable, not serving: cartesia:" in log and "HTTP 401" in log


def test_key_file_with_a_refused_key(provider_services, fake, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("sk_car_wrong\n")
    env = {"VOICEMESH_TTS_CARTESIA_ENDPOINT": fake.endpoint, "VOICEMESH_TTS_CARTESIA_API_KEY_FILE": str(key_file),
           "CARTESIA_API_KEY": ""}
    bad = provider_services.start("tts", "cartesia", env, name="tts-cartesia-badkey", wait=False,
                                  extra=["--probe-seconds", "0.3"])
    try:
        _wait_log(bad, "provider unreachable, not serving: cartesia:")
        _wait_health(bad.address, NOT_SERVING)
        with grpc.insecure_channel(bad.address) as channel:
            status, details = _status(tts_pb2_grpc.TtsServiceStub(channel), _requests())
        assert status == grpc.StatusCode.UNAUTHENTICATED and details.startswith("cartesia:"), details
        assert "refused the API key" in details  # the handshake's 401
        assert "sk_car_wrong" in fake.seen("auth")
        assert "sk_car_wrong" not in bad.log()
    finally:
        provider_services.stop(bad)


def test_no_secret_in_the_service_log(service):
    log = service.log()
    assert "provider" in log and API_KEY not in log


# --- in-process units -------------------------------------------------------------------------
def test_speed_by_model_family():
    assert speed_fields("sonic-2", 1.0) == {}
    assert speed_fields("sonic-2", 0.5) == {"__experimental_controls": {"speed": -0.5}}
    assert speed_fields("sonic-2", 2.0) == {"__experimental_controls": {"speed": 1.0}}
    assert speed_fields("sonic-3", 1.2) == {"generation_config": {"speed": 1.2}}
    assert speed_fields("sonic-latest", 0.8) == {"generation_config": {"speed": 0.8}}
    with pytest.raises(InvalidInput, match="cartesia: speed 2 is outside 0.6-1.5"):
        speed_fields("sonic-3", 2.0)
