"""The Azure AI Speech providers (STT `azure`, TTS `azure`) through the real service processes
(`voicemesh-serve stt|tts --provider azure`), with the real Speech SDK, pointed at a fake
Speech service on 127.0.0.1 speaking the SDK's websocket protocol (tests/cloud/fakes/azure_speech.py).

Skipped only where the SDK (the `azure` extra: Microsoft's proprietary licence) is not installed.
Nothing waits on time: each wait is for an event (a response, a fake's record, a health state)
with a deadline that fails saying what was seen.
"""
from __future__ import annotations

import queue
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytest.importorskip("azure.cognitiveservices.speech",
                    reason="the Azure Speech SDK (extra `azure`, azure-cognitiveservices-speech) is not installed")

from cloud.fakes.azure_speech import FakeAzureSpeech  # noqa: E402
from support import tone  # noqa: E402
from voicemesh.v1 import common_pb2, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc  # noqa: E402

KEY = "az-test-key-7d41e2b9"  # what the fake accepts; must never appear in a log or Info
WAIT_S = 60.0  # a liveness bound only
PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
MS = 32  # bytes per ms of PCM16 mono 16 kHz
R, S = stt_pb2.RecognizeRequest, tts_pb2.SynthesizeRequest
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
TEXT = "Hello there friend."


@pytest.fixture(scope="module")
def fake():
    with FakeAzureSpeech(api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("azure-secret") / "speech-key"
    path.write_text(KEY + "\n")
    return str(path)


@pytest.fixture(scope="module")
def stt(fake, provider_services, key_file):
    env = {"VOICEMESH_STT_AZURE_ENDPOINT": fake.host, "VOICEMESH_STT_AZURE_API_KEY_FILE": key_file,
           "AZURE_SPEECH_KEY": "", "SPEECH_KEY": ""}
    return provider_services.start("stt", "azure", env, extra=["--probe-seconds", "0.3"])


@pytest.fixture(scope="module")
def tts(fake, provider_services):
    return provider_services.start("tts", "azure", fake.env("tts"))


@pytest.fixture(scope="module")
def stt_stub(stt):
    with grpc.insecure_channel(stt.address) as channel:
        yield stt_pb2_grpc.SttServiceStub(channel)


@pytest.fixture(scope="module")
def tts_stub(tts):
    with grpc.insecure_channel(tts.address) as channel:
        yield tts_pb2_grpc.TtsServiceStub(channel)


@pytest.fixture(autouse=True)
def _reset(fake):
    fake.clear()
    yield
    fake.hold_after_chunks = None
    fake.release()
    fake.api_key = KEY
    fake.outage = None
    while fake.take_failure():
        pass


def _audio(seconds: float, chunk_ms: int = 100):
    pcm = tone(seconds).tobytes()
    return [R(audio=common_pb2.AudioChunk(data=pcm[i:i + chunk_ms * MS])) for i in range(0, len(pcm), chunk_ms * MS)]


class Recognize:
    """One Recognize call fed from a queue, so a test sends what it wants when it wants."""

    def __init__(self, stub, config: stt_pb2.SttConfig | None = None):
        self.requests: queue.Queue = queue.Queue()
        self.requests.put(R(config=config or stt_pb2.SttConfig(format=PCM16_16K, interim_results=True)))
        self.call = stub.Recognize(iter(self.requests.get, None), timeout=WAIT_S)
        self.seen: list[str] = []

    def send(self, *requests) -> None:
        for request in requests:
            self.requests.put(request)

    def until(self, predicate, what: str):
        for response in self.call:
            t = response.transcript
            self.seen.append(f"{'final' if t.is_final else 'interim'}:{t.text!r}" if response.HasField("transcript") else "eou")
            if predicate(response):
                return response
        raise AssertionError(f"the call ended before {what}; saw {self.seen}")

    def status(self) -> tuple[grpc.StatusCode, str]:
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as err:
            return err.code(), err.details()
        return grpc.StatusCode.OK, ""


def _final(r) -> bool:
    return r.HasField("transcript") and r.transcript.is_final


def _recognize_once(stub, language: str = "") -> tuple[grpc.StatusCode, str]:
    call = Recognize(stub, stt_pb2.SttConfig(format=PCM16_16K, language=language))
    call.send(R(turn_start=common_pb2.TurnContext(turn_id="t1")), *_audio(0.4), R(finalize=stt_pb2.Finalize(turn_id="t1")),
              None)
    return call.status()


# --- STT --------------------------------------------------------------------------------------
def test_stt_streams_interims_then_a_final_with_words(stt_stub, fake):
    call = Recognize(stt_stub)
    call.send(R(turn_start=common_pb2.TurnContext(turn_id="t1", audio_offset_ms=0)), *_audio(1.2))
    interim = call.until(lambda r: r.HasField("transcript"), "an interim").transcript
    assert (interim.text, interim.is_final) == ("what", False)  # before any finalize: results stream with the audio
    call.send(R(finalize=stt_pb2.Finalize(turn_id="t1")))
    final = call.until(_final, "the final").transcript
    assert final.text == "What is the capital of france." and final.turn_id == "t1"
    assert [w.text for w in final.words] == "what is the capital of france".split()
    assert [(w.start_ms, w.end_ms) for w in final.words[:2]] == [(0, 200), (200, 400)]  # ticks -> ms
    assert final.words[0].confidence == pytest.approx(0.9) and final.confidence == pytest.approx(0.9)
    assert final.language == "en-US"
    call.until(lambda r: r.HasField("end_of_utterance"), "the end of the utterance")
    assert fake.wait_for("audio_end")[0] == 1.2 * 16000 * 2  # every sample went, then the end of the audio
    request = fake.seen("request")[0]
    assert request["path"] == "/speech/recognition/conversation/cognitiveservices/v1"
    assert request["query"]["language"] == "en-US" and request["query"]["format"] == "detailed"
    assert request["query"]["wordLevelTimestamps"] == "true"
    assert fake.seen("auth")[0] == KEY  # from the key file
    call.send(None)
    assert call.status() == (grpc.StatusCode.OK, "")
    assert fake.wait_for("closed")[0]["complete"]


def test_stt_cancel_ends_the_upstream_request(stt_stub, fake):
    call = Recognize(stt_stub)
    call.send(R(turn_start=common_pb2.TurnContext(turn_id="t1")), *_audio(0.6))
    fake.wait_for("audio", count=3)
    call.call.cancel()  # hang-up mid-utterance, no finalize
    closed = fake.wait_for("closed", where=lambda d: d["kind"] == "stt")[0]
    assert 0 < closed["bytes"] <= 0.6 * 16000 * 2
    assert len(fake.seen("audio_end")) == 1  # the SDK ends the audio at once, so nothing more is billed


STT_ERRORS = [  # error class, status, words in the message
    ("auth", grpc.StatusCode.UNAUTHENTICATED, "Authentication error (401)"),
    ("throttle", grpc.StatusCode.RESOURCE_EXHAUSTED, "Too many requests (429)"),
    ("not_found", grpc.StatusCode.NOT_FOUND, "(404)"),
    ("bad_format", grpc.StatusCode.INVALID_ARGUMENT, "Unsupported audio format"),
    ("unavailable", grpc.StatusCode.UNAVAILABLE, "Service unavailable (503)"),
]


@pytest.mark.parametrize("error_class, code, words", STT_ERRORS, ids=[e[0] for e in STT_ERRORS])
def test_stt_errors_map_to_a_status_naming_azure(stt_stub, fake, error_class, code, words):
    fake.fail_next(error_class)
    status, details = _recognize_once(stt_stub)
    assert status == code, details
    assert details.startswith("azure: ") and words in details and KEY not in details


def test_stt_unsupported_language_is_invalid_argument(stt_stub, fake):
    status, details = _recognize_once(stt_stub, language="xx-XX")
    assert status == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("azure: ") and "xx-XX" in details
    assert fake.seen("request")[0]["query"]["language"] == "xx-XX"


def test_stt_services_own_bad_input(stt_stub):
    call = Recognize(stt_stub, stt_pb2.SttConfig(format=common_pb2.AudioFormat(encoding=9, sample_rate_hz=16000, channels=1)))
    call.send(None)
    status, details = call.status()
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "unsupported encoding" in details


def test_stt_info_and_log_hold_no_secret(stt_stub, stt, fake):
    info = stt_stub.Info(stt_pb2.SttServiceInfoRequest(), timeout=10).info
    text = str(info)
    assert info.provider == "azure" and KEY not in text
    assert 'value: "eastus"' in text and fake.host in text and "en-US" in text
    assert KEY not in stt.log() and "speech-key" in stt.log()  # the key's source is logged, never the key


def _wait_health(address: str, want: int, timeout: float = WAIT_S) -> None:
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


def test_health_follows_the_probe(stt, fake):
    assert "/sts/v1.0/issueToken" in fake.wait_for("probe")
    fake.api_key = "rotated"  # the service's key is no longer accepted
    _wait_health(stt.address, NOT_SERVING)
    fake.api_key = KEY
    _wait_health(stt.address, SERVING)
    fake.go_away()  # unreachable
    try:
        _wait_health(stt.address, NOT_SERVING)
    finally:
        fake.come_back()
    _wait_health(stt.address, SERVING)
    assert "the key was refused (HTTP 401)" in stt.log() and KEY not in stt.log()


# --- TTS --------------------------------------------------------------------------------------
def _synthesis(text: str = TEXT, fmt=PCM16_16K, **config):
    return iter([S(config=tts_pb2.TtsConfig(format=fmt, **config)),
                 S(text=tts_pb2.TextPiece(segment_id=1, text=text, end_of_segment=True))])


def _tts_status(stub, requests) -> tuple[grpc.StatusCode, str]:
    try:
        for _ in stub.Synthesize(requests, timeout=WAIT_S):
            pass
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def test_tts_streams_audio_before_the_synthesis_ends_with_words(tts_stub, fake):
    fake.hold_after_chunks = 2  # two chunks, then the fake waits: audio must reach the caller meanwhile
    call = tts_stub.Synthesize(_synthesis(), timeout=WAIT_S)
    first = next(call)
    assert first.HasField("audio") and first.audio.chunk.data
    assert fake.seen("turn_end") == [], "the first audio came only after the synthesis ended"
    fake.release()
    rest = list(call)
    audio = first.audio.chunk.data + b"".join(r.audio.chunk.data for r in rest if r.HasField("audio"))
    done = [r.segment_done for r in rest if r.HasField("segment_done")]
    assert len(done) == 1 and done[0].spoken_text == TEXT
    assert [(w.text, w.start_ms) for w in done[0].words] == [("Hello", 0), ("there", 100), ("friend", 200)]
    assert abs(len(audio) / MS - 380) <= 20, len(audio)  # 19 chars x 20 ms, resampled 24 -> 16 kHz
    assert fake.seen("synthesis_context")[-1]["synthesis"]["audio"]["outputFormat"] == "raw-24khz-16bit-mono-pcm"
    ssml = fake.seen("ssml")[-1]
    assert 'name="en-US-AvaMultilingualNeural"' in ssml and 'xml:lang="en-US"' in ssml and TEXT in ssml
    assert fake.seen("auth") == [], "the connection opened at start served it"


def test_tts_voice_language_and_speed_reach_the_ssml(tts_stub, fake):
    status, details = _tts_status(tts_stub, _synthesis("Guten Tag & so.", voice="de-DE-SeraphinaMultilingualNeural",
                                                       speed=1.2))
    assert status == grpc.StatusCode.OK, details
    ssml = fake.seen("ssml")[-1]
    assert 'name="de-DE-SeraphinaMultilingualNeural"' in ssml and 'xml:lang="de-DE"' in ssml
    assert '<prosody rate="1.20">Guten Tag &amp; so.</prosody>' in ssml


def test_tts_cancel_closes_the_upstream_request(tts_stub, fake):
    fake.hold_after_chunks = 2
    call = tts_stub.Synthesize(_synthesis("Cancel me before the end of it."), timeout=WAIT_S)
    assert next(call).HasField("audio")
    call.cancel()  # barge-in
    assert fake.wait_for("cancelled")[0] > 0
    assert fake.seen("turn_end") == []
    fake.hold_after_chunks = None
    assert _tts_status(tts_stub, _synthesis()) == (grpc.StatusCode.OK, "")  # the next call gets a fresh connection
    assert fake.seen("auth") == [KEY]


TTS_ERRORS = [  # error class, failures in a row, status, words
    ("auth", 1, grpc.StatusCode.UNAUTHENTICATED, "Authentication error (401)"),
    ("throttle", 1, grpc.StatusCode.RESOURCE_EXHAUSTED, "Error code: 4429"),
    ("not_found", 1, grpc.StatusCode.NOT_FOUND, "Unsupported voice en-US-AvaMultilingualNeural"),
    ("bad_format", 1, grpc.StatusCode.INVALID_ARGUMENT, "Unsupported output format"),
    ("unavailable", 0, grpc.StatusCode.UNAVAILABLE, "Service unavailable (503)"),  # an outage: see below
]


@pytest.mark.parametrize("error_class, times, code, words", TTS_ERRORS, ids=[e[0] for e in TTS_ERRORS])
def test_tts_errors_map_to_a_status_naming_azure(tts_stub, fake, error_class, times, code, words):
    for _ in range(times):
        fake.fail_next(error_class)
    if error_class == "unavailable":  # the SDK may retry a 503 handshake with a new connection: all get it
        fake.set_outage(503)
    try:
        status, details = _tts_status(tts_stub, _synthesis())
    finally:
        fake.outage = None
    assert status == code, details
    assert fake.take_failure() is None, "every failure asked for was used"
    assert details.startswith("azure: ") and words in details and KEY not in details
    assert _tts_status(tts_stub, _synthesis()) == (grpc.StatusCode.OK, "")  # and the next call is fine


def test_tts_unknown_voice_is_refused_by_the_service(tts_stub, fake):
    status, details = _tts_status(tts_stub, _synthesis(voice="en-US-Nobody"))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "unknown voice 'en-US-Nobody'" in details
    assert fake.seen("ssml") == []  # refused before reaching Azure


def test_tts_info_and_log_hold_no_secret(tts_stub, tts, fake):
    response = tts_stub.Info(tts_pb2.TtsServiceInfoRequest(), timeout=10)
    text = str(response)
    assert response.info.provider == "azure" and KEY not in text
    assert "en-US-AvaMultilingualNeural" in response.info.model and fake.host in text
    assert list(response.voices) == list(fake.voices)  # from the voice list
    assert KEY not in tts.log() and "AZURE_SPEECH_KEY" in tts.log()


def test_tts_sample_rate_setting_asks_azure_for_that_format(provider_services, fake):
    service = provider_services.start("tts", "azure", {**fake.env("tts"), "VOICEMESH_TTS_AZURE_SAMPLE_RATE_HZ": "16000"},
                                      name="tts-azure-16k")
    try:
        with grpc.insecure_channel(service.address) as channel:
            status, details = _tts_status(tts_pb2_grpc.TtsServiceStub(channel), _synthesis())
        assert status == grpc.StatusCode.OK, details
        assert fake.seen("synthesis_context")[-1]["synthesis"]["audio"]["outputFormat"] == "raw-16khz-16bit-mono-pcm"
    finally:
        provider_services.stop(service)


# --- in process -------------------------------------------------------------------------------
def test_cancellation_codes_map_to_statuses():
    import azure.cognitiveservices.speech as speechsdk

    from voicemesh.runtime import errors
    from voicemesh.stt.providers.azure import error_for as stt_error
    from voicemesh.tts.providers.azure import error_for as tts_error

    code = speechsdk.CancellationErrorCode
    tts_only = {"Error code: 1007. Error details: Unsupported voice x-Y."}
    cases = [
        (code.AuthenticationFailure, "Authentication error (401). SessionId: 1f", errors.Unauthenticated),
        (code.AuthenticationFailure, "WebSocket upgrade failed: Authentication error (403).", errors.PermissionDenied),
        (code.Forbidden, "Forbidden", errors.PermissionDenied),
        (code.TooManyRequests, "Error code: 4429. throttled", errors.ResourceExhausted),
        (code.BadRequest, "Error code: 1007. Error details: Quota exceeded.", errors.ResourceExhausted),
        (code.BadRequest, "Error code: 1007. Unsupported Locale", errors.InvalidInput),
        (code.BadRequest, "Error code: 1007. Error details: Unsupported voice x-Y.", errors.NotFound),
        (code.ServiceError, "Internal service error (404).", errors.NotFound),
        (code.ServiceTimeout, "timeout", errors.DeadlineExceeded),
        (code.ConnectionFailure, "Connection failed", errors.Unavailable),
        (code.ServiceUnavailable, "Service unavailable (503)", errors.Unavailable),
    ]
    for error_code, details, kind in cases:
        mapped_by = [tts_error(error_code, details, "x-Y")] + ([] if details in tts_only else [stt_error(error_code, details)])
        for mapped in mapped_by:
            assert type(mapped) is kind, (error_code, details, mapped)
            assert mapped.message.startswith("azure: ") and "SessionId" not in mapped.message


async def test_tts_probe_checks_the_key_and_reachability(fake, monkeypatch):
    from voicemesh.tts.providers.azure import AzureTtsProvider, AzureTtsSettings

    monkeypatch.setenv("AZURE_SPEECH_KEY", KEY)
    provider = AzureTtsProvider(AzureTtsSettings(endpoint=fake.host))
    assert await provider.probe() is None
    assert fake.seen("probe") == ["/sts/v1.0/issueToken"]
    fake.api_key = "rotated"
    assert "the key was refused (HTTP 401)" in await provider.probe()
    assert "cannot reach" in await AzureTtsProvider(AzureTtsSettings(endpoint="ws://127.0.0.1:9")).probe()
    assert await AzureTtsProvider(AzureTtsSettings(endpoint=fake.host, probe="none")).probe() is None
