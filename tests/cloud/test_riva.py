"""The Riva providers through the real services: `voicemesh-serve stt|tts --provider riva`, each its
own process, pointed at a fake Riva (tests/cloud/fakes/riva.py: the riva wheel's own stubs on
127.0.0.1) that requires NVCF's bearer key and function-id, as NVIDIA-hosted Riva does.

The STT service takes its settings from env (key from a mounted file), the TTS service from
flags (key from NVIDIA_API_KEY), so both configuration paths run. The fast unit tests at the
end call the mapping functions directly.
"""
from __future__ import annotations

import queue
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.fakes.backends import ToneTts
from cloud.fakes.base import ERROR_CLASSES
from cloud.fakes.riva import FakeRiva
from support import tone
from voicemesh.v1 import common_pb2, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc

KEY = "nvapi-voicemesh-test-key-8f3a"  # must never show in a log or in Info
FUNCTION_ID = "0e4e6a43-riva-asr-test"
MODEL = "conformer-en-US-asr-streaming"
PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
MULAW_8K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000, channels=1)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
EXPECTED = {"auth": grpc.StatusCode.UNAUTHENTICATED, "throttle": grpc.StatusCode.RESOURCE_EXHAUSTED,
            "not_found": grpc.StatusCode.NOT_FOUND, "bad_format": grpc.StatusCode.INVALID_ARGUMENT,
            "unavailable": grpc.StatusCode.UNAVAILABLE}
TRANSIENT = ("throttle", "unavailable")
WAIT_S = 60.0


@pytest.fixture(scope="module")
def riva():
    fake = FakeRiva(api_key=KEY, function_id=FUNCTION_ID).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def stt(riva, provider_services, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("riva-secret") / "api-key"
    key_file.write_text(KEY + "\n")
    return provider_services.start("stt", "riva", {
        "VOICEMESH_STT_RIVA_ENDPOINT": riva.address, "VOICEMESH_STT_RIVA_FUNCTION_ID": FUNCTION_ID,
        "VOICEMESH_STT_RIVA_API_KEY_FILE": str(key_file), "VOICEMESH_STT_RIVA_MODEL": MODEL,
        "VOICEMESH_STT_PROBE_SECONDS": "0.5", "NVIDIA_API_KEY": "",
    })


@pytest.fixture(scope="module")
def tts(riva, provider_services):
    return provider_services.start("tts", "riva", {"NVIDIA_API_KEY": KEY, "VOICEMESH_TTS_PROBE_SECONDS": "0.5"},
                                   extra=["--endpoint", riva.address, "--function-id", FUNCTION_ID, "--sample-rate-hz",
                                          "22050"])


# --- helpers ---------------------------------------------------------------------------------------
def _stt_requests(fmt=PCM16_16K, language="", audio: bytes = b"", turn_at_ms: int | None = 0, chunk_ms: int = 40):
    R = stt_pb2.RecognizeRequest
    yield R(config=stt_pb2.SttConfig(format=fmt, language=language, interim_results=True))
    step = fmt.sample_rate_hz * (2 if fmt.encoding == common_pb2.AUDIO_ENCODING_PCM16 else 1) * chunk_ms // 1000
    bytes_per_ms = step // chunk_ms
    assert turn_at_ms is None or turn_at_ms % chunk_ms == 0
    for begin in range(0, len(audio), step):
        if turn_at_ms is not None and begin == turn_at_ms * bytes_per_ms:
            yield R(turn_start=common_pb2.TurnContext(turn_id="t1", audio_offset_ms=turn_at_ms))
        yield R(audio=common_pb2.AudioChunk(data=audio[begin:begin + step]))
    yield R(finalize=stt_pb2.Finalize(turn_id="t1"))


def _collect(responses) -> tuple[list, grpc.StatusCode, str]:
    got = []
    try:
        for response in responses:
            got.append(response)
    except grpc.RpcError as err:
        return got, err.code(), err.details()
    return got, grpc.StatusCode.OK, ""


def _recognize(stt, requests):
    with grpc.insecure_channel(stt.address) as channel:
        return _collect(stt_pb2_grpc.SttServiceStub(channel).Recognize(requests, timeout=WAIT_S))


def _synthesize(tts, text="Hello there, how are you today?", voice="", fmt=PCM16_16K, language="", speed=0.0):
    config = tts_pb2.TtsConfig(format=fmt, voice=voice, language=language, speed=speed)
    requests = [tts_pb2.SynthesizeRequest(config=config),
                tts_pb2.SynthesizeRequest(text=tts_pb2.TextPiece(segment_id=1, text=text, end_of_segment=True))]
    with grpc.insecure_channel(tts.address) as channel:
        return _collect(tts_pb2_grpc.TtsServiceStub(channel).Synthesize(iter(requests), timeout=WAIT_S))


def _pcm(seconds: float) -> bytes:
    return tone(seconds).astype("<i2").tobytes()


def _mulaw(seconds: float) -> bytes:
    x = np.clip(tone(seconds, rate=8000).astype(np.float64) / 32768.0, -1, 1)
    y = np.sign(x) * np.log1p(255 * np.abs(x)) / np.log1p(255)
    return (~(((y + 1) / 2 * 255).astype(np.uint8) ^ 0x80)).astype(np.uint8).tobytes()


def _wait_health(service, wanted: int, timeout: float = WAIT_S) -> None:
    seen = []
    with grpc.insecure_channel(service.address) as channel:
        try:
            for response in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=timeout):
                seen.append(response.status)
                if response.status == wanted:
                    return
        except grpc.RpcError as err:
            raise AssertionError(f"{service.kind}: health never became {wanted} ({err.code()}); saw {seen}\n"
                                 f"{service.log()[-2000:]}") from None


def _transcripts(responses):
    return [r.transcript for r in responses if r.HasField("transcript")]


def _audio(responses) -> bytes:
    return b"".join(r.audio.chunk.data for r in responses if r.HasField("audio"))


class GatedTts:
    """ToneTts that stops after `before` chunks until `gate` is set (from the test's thread)."""

    def __init__(self, before: int = 2):
        self.before = before
        self.gate = threading.Event()

    async def synthesize(self, text, sample_rate_hz, voice=""):
        import asyncio

        count = 0
        async for chunk in ToneTts().synthesize(text, sample_rate_hz, voice):
            if count == self.before:
                await asyncio.to_thread(self.gate.wait, WAIT_S)
            count += 1
            yield chunk


# --- STT -------------------------------------------------------------------------------------------
def test_stt_streams_interims_then_one_final_with_words(riva, stt):
    """0.48 s before the turn, 1.52 s after: Riva gets the turn from 230 ms (a 250 ms preroll), word
    times come back on the stream's clock, an interim comes before the final."""
    before, configs = len(riva.seen("audio")), len(riva.seen("stt_config"))
    audio = _pcm(2.0)
    responses, code, details = _recognize(stt, _stt_requests(language="en", audio=audio, turn_at_ms=480))
    assert code == grpc.StatusCode.OK, details
    transcripts = _transcripts(responses)
    finals = [t for t in transcripts if t.is_final and t.text]
    assert [t.text for t in finals] == ["what is the capital of france"], transcripts
    first_final = transcripts.index(finals[0])
    assert any(not t.is_final and t.text == "what" for t in transcripts[:first_final]), transcripts
    final = finals[0]
    assert [w.text for w in final.words] == final.text.split()
    assert final.words[0].start_ms == 230 and final.words[-1].end_ms <= 2000, final.words
    assert all(w.confidence > 0 for w in final.words) and final.confidence > 0
    assert any(r.HasField("end_of_utterance") and r.end_of_utterance.turn_id == "t1" for r in responses)
    config = riva.seen("stt_config")[configs]  # (then one for the empty segment the end of the requests finalizes)
    assert config == {"encoding": 1, "sample_rate_hertz": 16000, "language": "en-US", "model": MODEL,
                      "word_time_offsets": True, "punctuation": True, "interim_results": True}, config
    sent = b"".join(riva.seen("audio")[before:])
    assert sent == audio[230 * 32:], (len(sent), len(audio) - 230 * 32)
    metadata = riva.seen("stt_metadata")[-1]
    assert metadata["authorization"] == f"Bearer {KEY}" and metadata["function-id"] == FUNCTION_ID


def test_stt_mulaw_8k_reaches_riva_as_pcm16_16k(riva, stt):
    before, configs = len(riva.seen("audio")), len(riva.seen("stt_config"))
    responses, code, details = _recognize(stt, _stt_requests(fmt=MULAW_8K, audio=_mulaw(1.0)))
    assert code == grpc.StatusCode.OK, details
    assert riva.seen("stt_config")[configs]["sample_rate_hertz"] == 16000
    sent = sum(len(chunk) for chunk in riva.seen("audio")[before:])
    assert 0.9 * 32000 <= sent <= 32000, sent
    assert any(t.is_final and t.text for t in _transcripts(responses))


def test_stt_cancel_closes_the_upstream_request(riva, stt):
    """The caller cancels mid-utterance (barge-in, hang-up): Riva's request is cancelled, not
    half-closed, so it stops decoding."""
    requests: queue.Queue = queue.Queue()
    cancelled, closed, audio = riva.seen("cancelled").count("stt"), len(riva.seen("stream_closed")), len(riva.seen("audio"))
    with grpc.insecure_channel(stt.address) as channel:
        call = stt_pb2_grpc.SttServiceStub(channel).Recognize(iter(requests.get, None), timeout=WAIT_S)
        requests.put(stt_pb2.RecognizeRequest(config=stt_pb2.SttConfig(format=PCM16_16K, interim_results=True)))
        requests.put(stt_pb2.RecognizeRequest(turn_start=common_pb2.TurnContext(turn_id="c1", audio_offset_ms=0)))
        requests.put(stt_pb2.RecognizeRequest(audio=common_pb2.AudioChunk(data=_pcm(0.4))))
        riva.wait_for("audio", audio + 1)  # the utterance's request is open upstream
        call.cancel()
        requests.put(None)
    assert riva.wait_for("cancelled", cancelled + 1, where=lambda kind: kind == "stt")
    assert len(riva.seen("stream_closed")) == closed  # cancelled before the empty response: never "finished"


@pytest.mark.parametrize("error_class", ERROR_CLASSES)
def test_stt_provider_errors_map_to_status(riva, stt, error_class):
    riva.fail_next(error_class)
    _, code, details = _recognize(stt, _stt_requests(audio=_pcm(0.3)))
    assert code == EXPECTED[error_class], details
    assert details.startswith("riva: "), details


def test_stt_unsupported_language_and_missing_model(riva, stt):
    _, code, details = _recognize(stt, _stt_requests(language="xx-XX", audio=_pcm(0.3)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "riva: language 'xx-XX'" in details and "available: de-DE, en-US" in details, details
    # German is served, but not by the English model this service is configured with: Riva's answer.
    _, code, details = _recognize(stt, _stt_requests(language="de-DE", audio=_pcm(0.3)))
    assert code == grpc.StatusCode.NOT_FOUND, details
    assert f"model '{MODEL}' for de-DE is not deployed" in details, details


def test_stt_servicer_bad_input_with_riva(stt):
    _, code, details = _recognize(stt, iter([stt_pb2.RecognizeRequest(config=stt_pb2.SttConfig(
        format=common_pb2.AudioFormat(encoding=9, sample_rate_hz=16000, channels=1)))]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unsupported encoding" in details, details


def test_stt_info_names_riva_without_secrets(stt):
    with grpc.insecure_channel(stt.address) as channel:
        info = stt_pb2_grpc.SttServiceStub(channel).Info(stt_pb2.SttServiceInfoRequest(), timeout=10).info
    assert info.provider == "riva" and info.model == MODEL
    assert info.details["endpoint"].startswith("127.0.0.1:") and info.details["language"] == "en-US"
    assert info.details["function_id"] == FUNCTION_ID and info.details["languages"] == "de-DE,en-US"
    assert KEY not in str(info)


# --- TTS -------------------------------------------------------------------------------------------
def test_tts_streams_audio_before_synthesis_ends(riva, tts):
    backend = riva.tts_backend = GatedTts(before=2)
    text = "Hello there, how are you today?"
    requests: queue.Queue = queue.Queue()
    try:
        with grpc.insecure_channel(tts.address) as channel:
            responses = tts_pb2_grpc.TtsServiceStub(channel).Synthesize(iter(requests.get, None), timeout=WAIT_S)
            requests.put(tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(format=PCM16_16K)))
            requests.put(tts_pb2.SynthesizeRequest(text=tts_pb2.TextPiece(segment_id=1, text=text, end_of_segment=True)))
            requests.put(None)
            first = next(responses)
            assert first.HasField("audio"), first
            done_before = len(riva.seen("tts_done"))
            backend.gate.set()
            rest, code, details = _collect(responses)
        assert code == grpc.StatusCode.OK, details
    finally:
        backend.gate.set()
        riva.tts_backend = ToneTts()
    assert done_before == len(riva.seen("tts_done")) - 1  # the first audio left before Riva finished
    request = riva.seen("tts_request")[-1]
    assert request == {"text": text, "voice": "", "language": "en-US", "encoding": 1, "sample_rate_hz": 22050}, request
    duration_s = len(first.audio.chunk.data + _audio(rest)) / 32000  # resampled to the 16 kHz asked for
    assert abs(duration_s - len(text) * 0.020) < 0.05, duration_s
    assert rest[-1].segment_done.spoken_text == text


def test_tts_cancel_stops_riva(riva, tts):
    backend = riva.tts_backend = GatedTts(before=2)
    before = riva.seen("cancelled").count("tts")
    requests: queue.Queue = queue.Queue()
    try:
        with grpc.insecure_channel(tts.address) as channel:
            responses = tts_pb2_grpc.TtsServiceStub(channel).Synthesize(iter(requests.get, None), timeout=WAIT_S)
            requests.put(tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(format=PCM16_16K)))
            requests.put(tts_pb2.SynthesizeRequest(text=tts_pb2.TextPiece(segment_id=1, text="A long sentence. " * 5,
                                                                         end_of_segment=True)))
            assert next(responses).HasField("audio")
            responses.cancel()
            requests.put(None)
        assert riva.wait_for("cancelled", before + 1, where=lambda kind: kind == "tts")
    finally:
        backend.gate.set()
        riva.tts_backend = ToneTts()


@pytest.mark.parametrize("error_class", ERROR_CLASSES)
def test_tts_provider_errors_map_to_status(riva, tts, error_class):
    for _ in range(3 if error_class in TRANSIENT else 1):  # a transient one is tried 3 times before any audio
        riva.fail_next(error_class)
    _, code, details = _synthesize(tts, voice="English-US.Male-1")
    assert code == EXPECTED[error_class], details
    assert details.startswith("riva: "), details
    if error_class == "not_found":
        assert "voice 'English-US.Male-1'" in details and "available: English-US.Female-1" in details, details


def test_tts_transient_failure_before_audio_is_retried(riva, tts):
    requests = len(riva.seen("tts_request"))
    riva.fail_next("unavailable")
    responses, code, details = _synthesize(tts)
    assert code == grpc.StatusCode.OK and _audio(responses), details
    assert len(riva.seen("tts_request")) == requests + 2  # the refused one, then the one that spoke


def test_tts_bad_input(riva, tts):
    _, code, details = _synthesize(tts, voice="Nobody.Here")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown voice 'Nobody.Here'" in details, details
    assert "English-US.Female-1" in details
    _, code, details = _synthesize(tts, fmt=common_pb2.AudioFormat(encoding=1, sample_rate_hz=96000, channels=1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside 8000-48000" in details, details
    _, code, details = _synthesize(tts, language="fr-FR")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "riva: no voice for language 'fr-FR'" in details, details


def test_tts_voice_language_and_mulaw_out(riva, tts):
    """A voice speaks its own language; 22.05 kHz from Riva leaves as 8 kHz mu-law."""
    text = "Guten Tag."
    responses, code, details = _synthesize(tts, text=text, voice="German-DE.Male-1", fmt=MULAW_8K)
    assert code == grpc.StatusCode.OK, details
    assert riva.seen("tts_request")[-1]["language"] == "de-DE"
    assert abs(len(_audio(responses)) / 8000 - len(text) * 0.020) < 0.05
    _, code, details = _synthesize(tts, text="Fish & chips.", speed=1.25)  # speed goes as SSML, the text escaped
    assert code == grpc.StatusCode.OK, details
    assert riva.seen("tts_request")[-1]["text"] == '<speak><prosody rate="125%">Fish &amp; chips.</prosody></speak>'


def test_tts_info_lists_riva_voices_without_secrets(tts):
    with grpc.insecure_channel(tts.address) as channel:
        response = tts_pb2_grpc.TtsServiceStub(channel).Info(tts_pb2.TtsServiceInfoRequest(), timeout=10)
    assert response.info.provider == "riva" and response.info.details["sample_rate_hz"] == "22050"
    assert list(response.voices) == ["English-US.Female-1", "English-US.Male-1", "German-DE.Male-1"]
    assert response.info.details["endpoint"].startswith("127.0.0.1:")
    assert KEY not in str(response)


# --- both: health and logs -------------------------------------------------------------------------
def test_health_follows_riva_credentials_and_reachability(riva, stt, tts):
    try:
        riva.api_key = "a-rotated-key"  # the services' key is refused now
        for service in (stt, tts):
            _wait_health(service, NOT_SERVING)
        riva.api_key = KEY
        for service in (stt, tts):
            _wait_health(service, SERVING)
        riva.pause()  # gone
        for service in (stt, tts):
            _wait_health(service, NOT_SERVING)
    finally:
        riva.api_key = KEY
        if riva._server is None:
            riva.resume()
    for service in (stt, tts):
        _wait_health(service, SERVING)
    assert "UNAUTHENTICATED" in stt.log() and "UNAVAILABLE" in tts.log()


def test_no_secret_in_service_logs(stt, tts):
    for service in (stt, tts):
        log = service.log()
        assert "riva" in log and KEY not in log, service.kind


# --- in-process units ------------------------------------------------------------------------------
def test_unit_probe_reasons(riva, monkeypatch):
    """What keeps a service NOT_SERVING, said as the log will say it."""
    import asyncio

    from voicemesh.stt.providers.riva import RivaSttProvider, RivaSttSettings
    from voicemesh.tts.providers.riva import RivaTtsProvider, RivaTtsSettings

    async def reasons(provider):
        await provider.load()
        try:
            return await provider.probe()
        finally:
            await provider.close()

    monkeypatch.setenv("NVIDIA_API_KEY", KEY)
    stt = RivaSttSettings(endpoint=riva.address, function_id=FUNCTION_ID, model="parakeet-xx")
    reason = asyncio.run(reasons(RivaSttProvider(stt)))
    assert reason.startswith("riva: model 'parakeet-xx' is not deployed") and MODEL in reason, reason
    tts = RivaTtsSettings(endpoint=riva.address, function_id=FUNCTION_ID, voice="English-US.Nobody")
    reason = asyncio.run(reasons(RivaTtsProvider(tts)))
    assert "voice 'English-US.Nobody' does not exist" in reason and "English-US.Female-1" in reason, reason
    monkeypatch.setenv("NVIDIA_API_KEY", "nvapi-wrong")
    reason = asyncio.run(reasons(RivaTtsProvider(RivaTtsSettings(endpoint=riva.address, function_id=FUNCTION_ID))))
    assert "UNAUTHENTICATED" in reason and "nvapi-wrong" not in reason, reason
    monkeypatch.delenv("NVIDIA_API_KEY")
    with pytest.raises(SystemExit, match="NVIDIA_API_KEY"):  # NVCF without a key: the process does not start
        RivaSttProvider(RivaSttSettings(endpoint=riva.address, function_id=FUNCTION_ID))


def test_unit_transcripts_join_interim_parts_and_keep_finals():
    from riva.client.proto import riva_asr_pb2

    from voicemesh.stt.providers.riva import transcripts

    response = riva_asr_pb2.StreamingRecognizeResponse()
    final = response.results.add(is_final=True)
    alt = final.alternatives.add(transcript="hello world ", confidence=0.8)
    alt.words.add(word="hello", start_time=100, end_time=400, confidence=0.9)
    alt.words.add(word="world", start_time=450, end_time=800, confidence=0.7)
    response.results.add(is_final=False, stability=0.9).alternatives.add(transcript="how")
    response.results.add(is_final=False, stability=0.1, audio_processed=1.2).alternatives.add(transcript="are")
    response.results.add(is_final=False)  # no alternatives: skipped
    got = transcripts(response, "en-US")
    assert [(t.text, t.is_final) for t in got] == [("hello world", True), ("how are", False)]
    assert got[0].start_ms == 100 and got[0].end_ms == 800 and got[0].confidence == pytest.approx(0.8)
    assert got[1].stability == pytest.approx(0.1) and got[1].end_ms == 1200 and got[1].language == "en-US"


def test_unit_error_mapping_and_language_resolution():
    from voicemesh.runtime import errors
    from voicemesh.stt.providers.riva import resolve_language, riva_error

    class Err(grpc.aio.AioRpcError):
        def __init__(self, code, details):
            super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    unavailable_model = "Error: Unavailable model requested given these parameters: language_code=xx"
    cases = [(grpc.StatusCode.UNAUTHENTICATED, "", True, errors.Unauthenticated),
             (grpc.StatusCode.PERMISSION_DENIED, "", True, errors.PermissionDenied),
             (grpc.StatusCode.RESOURCE_EXHAUSTED, "", True, errors.ResourceExhausted),
             (grpc.StatusCode.NOT_FOUND, "", True, errors.NotFound),
             (grpc.StatusCode.INVALID_ARGUMENT, unavailable_model, True, errors.NotFound),
             (grpc.StatusCode.INVALID_ARGUMENT, unavailable_model, False, errors.InvalidInput),
             (grpc.StatusCode.INVALID_ARGUMENT, "bad header", True, errors.InvalidInput),
             (grpc.StatusCode.UNAVAILABLE, "", True, errors.Unavailable),
             (grpc.StatusCode.INTERNAL, "", True, errors.Unavailable)]
    for code, details, named, expected in cases:
        mapped = riva_error(Err(code, details), "x", "what is missing", named)
        assert type(mapped) is expected and mapped.message.startswith("riva: x"), (code, mapped)
    assert resolve_language("en", "en-US", ["de-DE", "en-GB", "en-US"]) == "en-US"
    assert resolve_language("de", "en-US", ["de-DE", "en-US"]) == "de-DE"
    assert resolve_language("", "en-US", []) == "en-US"
    assert resolve_language("xx", "en-US", ["en-US"]) == "xx"


def test_unit_voices_from_synthesis_config():
    from riva.client.proto import riva_tts_pb2

    from voicemesh.tts.providers.riva import listed_voices

    response = riva_tts_pb2.RivaSynthesisConfigResponse()
    response.model_config.add(model_name="magpie", parameters={
        "voice_name": "Magpie-Multilingual", "language_code": "en-US,es-US", "subvoices": "EN-US.Aria:0,ES-US.Diego:1"})
    assert listed_voices(response) == {"Magpie-Multilingual.EN-US.Aria": ["en-US", "es-US"],
                                       "Magpie-Multilingual.ES-US.Diego": ["en-US", "es-US"]}
