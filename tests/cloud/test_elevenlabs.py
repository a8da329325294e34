"""The ElevenLabs TTS provider, through the real TTS service process (`voicemesh-serve tts
--provider elevenlabs`), against a fake ElevenLabs on 127.0.0.1 speaking its WebSocket API."""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.fakes.elevenlabs import API_KEY, FakeElevenLabs
from voicemesh.runtime.errors import NotFound, ResourceExhausted, Unauthenticated
from voicemesh.tts.providers import wsclient
from voicemesh.tts.providers.base import WordMark
from voicemesh.tts.providers.elevenlabs import _Words, language_code
from voicemesh.v1 import common_pb2, tts_pb2, tts_pb2_grpc

PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
MULAW_8K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000, channels=1)
DEFAULT_VOICE = "JBFqnCBsd6RMkjVDRZzb"
TEXT = "Hello there friend."
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def fake():
    with FakeElevenLabs() as running:
        yield running


@pytest.fixture(scope="module")
def service(provider_services, fake):
    return provider_services.start("tts", "elevenlabs", fake.env(), extra=["--probe-seconds", "0.3"])


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
    assert request == {"text": TEXT, "voice": DEFAULT_VOICE, "model": "eleven_flash_v2_5", "format": "pcm_24000",
                       "language": "", "voice_settings": None}
    assert fake.seen("auth")[-1] == API_KEY


def test_mulaw_8k_voice_language_and_speed_reach_elevenlabs(stub, fake):
    status, details = _status(stub, _requests(fmt=MULAW_8K, voice="21m00Tcm4TlvDq8ikWAM", language="de-DE", speed=1.1))
    assert status == grpc.StatusCode.OK, details
    request = fake.seen("request")[-1]
    assert (request["voice"], request["language"], request["voice_settings"]) == ("21m00Tcm4TlvDq8ikWAM", "de",
                                                                                  {"speed": pytest.approx(1.1)})


def test_cancel_closes_the_upstream_socket(stub, fake):
    fake.hold(2)
    call = stub.Synthesize(_requests("Cancel me before the end of it."), timeout=60)
    assert next(call).HasField("audio")
    call.cancel()
    fake.wait_for("closed", where=lambda text: text.startswith("Cancel me"))
    assert "Cancel me before the end of it." not in fake.seen("done")


def test_an_error_after_audio_ends_the_stream_without_a_retry(stub, fake):
    fake.error_after = 2
    attempts = len(fake.seen("auth"))
    call = stub.Synthesize(_requests("This one fails half way through."), timeout=60)
    got_audio = False
    with pytest.raises(grpc.RpcError) as err:
        for response in call:
            got_audio = got_audio or response.HasField("audio")
    assert got_audio and err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert err.value.details().startswith("elevenlabs: internal_error"), err.value.details()
    assert len(fake.seen("auth")) - attempts == 1  # audio had gone out: never retried mid-stream


@pytest.mark.parametrize("error_class, code, words", [
    ("auth", grpc.StatusCode.UNAUTHENTICATED, "check the API key"),
    ("throttle", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent requests"),
    ("not_found", grpc.StatusCode.NOT_FOUND, "voice_not_found"),
    ("bad_format", grpc.StatusCode.INVALID_ARGUMENT, "Invalid output format"),
    ("unavailable", grpc.StatusCode.UNAVAILABLE, "HTTP 503"),
])
def test_errors_map_to_a_status_naming_elevenlabs(stub, fake, error_class, code, words):
    for _ in range(3):  # transient classes are retried (3 attempts, before any audio); the rest fail at once
        fake.fail_next(error_class)
    status, details = _status(stub, _requests())
    assert status == code, details
    assert details.startswith("elevenlabs:") and words in details, details


def test_one_transient_failure_is_retried(stub, fake):
    attempts = len(fake.seen("auth"))
    fake.fail_next("unavailable")
    status, details = _status(stub, _requests())
    assert status == grpc.StatusCode.OK, details
    assert len(fake.seen("auth")) - attempts == 2


@pytest.mark.parametrize("config, words", [
    ({"voice": "no-such-voice"}, "unknown voice 'no-such-voice'; available: 21m00Tcm4TlvDq8ikWAM, JBFqnCBsd6RMkjVDRZzb"),
    ({"speed": 1.5}, "elevenlabs: speed 1.5 is outside 0.7-1.2"),
    ({"speed": 3.0}, "speed 3.0 is outside 0.5-2.0"),
])
def test_bad_input(stub, config, words):
    status, details = _status(stub, _requests(**config))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and words in details, details


def test_info_names_provider_model_voice_and_no_secret(stub, fake):
    info = stub.Info(tts_pb2.TtsServiceInfoRequest(), timeout=10)
    assert (info.info.provider, info.info.model) == ("elevenlabs", "eleven_flash_v2_5")
    assert info.info.details["voice"] == DEFAULT_VOICE and info.info.details["endpoint"] == fake.endpoint
    assert info.info.details["output_format"] == "pcm_24000"
    assert list(info.voices) == ["21m00Tcm4TlvDq8ikWAM", DEFAULT_VOICE]
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
    assert "provider unreachable, not serving: elevenlabs:" in log and "HTTP 401" in log


def test_key_file_with_a_refused_key(provider_services, fake, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("el-wrong-key\n")
    env = {"VOICEMESH_TTS_ELEVENLABS_ENDPOINT": fake.endpoint, "VOICEMESH_TTS_ELEVENLABS_API_KEY_FILE": str(key_file),
           "ELEVENLABS_API_KEY": ""}
    bad = provider_services.start("tts", "elevenlabs", env, name="tts-elevenlabs-badkey", wait=False,
                                  extra=["--probe-seconds", "0.3"])
    try:
        _wait_log(bad, "provider unreachable, not serving: elevenlabs:")
        _wait_health(bad.address, NOT_SERVING)
        with grpc.insecure_channel(bad.address) as channel:
            status, details = _status(tts_pb2_grpc.TtsServiceStub(channel), _requests())
        assert status == grpc.StatusCode.UNAUTHENTICATED and details.startswith("elevenlabs:"), details
        assert "el-wrong-key" in fake.seen("auth")
        assert "el-wrong-key" not in bad.log()
    finally:
        provider_services.stop(bad)


def test_no_secret_in_the_service_log(service):
    log = service.log()
    assert "provider" in log and API_KEY not in log


# --- in-process units -------------------------------------------------------------------------
def test_words_from_per_chunk_alignment():
    words = _Words()
    first = words.feed({"chars": list("Hi the"), "charStartTimesMs": [0, 10, 20, 30, 40, 50]}, offset_ms=0)
    second = words.feed({"chars": list("re you"), "charStartTimesMs": [0, 10, 20, 30, 40, 50]}, offset_ms=100)
    assert first == [WordMark("Hi", 0)]
    assert second == [WordMark("there", 30)]  # a word split across two chunks keeps its first char's time
    assert words.flush() == [WordMark("you", 130)]


def test_language_codes_and_in_stream_errors():
    assert (language_code("en-US"), language_code("pt_BR"), language_code("")) == ("en", "pt", "")
    assert isinstance(wsclient.classify("elevenlabs", "quota_exceeded This request exceeds your quota"), ResourceExhausted)
    assert isinstance(wsclient.classify("elevenlabs", "invalid_api_key"), Unauthenticated)
    assert isinstance(wsclient.close_error("elevenlabs", 1008, "voice_not_found: x", "audio"), NotFound)
    assert wsclient.ws_base("https://api.eu.residency.elevenlabs.io/") == "wss://api.eu.residency.elevenlabs.io"
