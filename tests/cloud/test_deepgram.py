"""The Deepgram STT provider, through the real STT service process (`voicemesh-serve stt
--provider deepgram`), pointed at a fake Deepgram (tests/cloud/fakes/deepgram.py) speaking the
live-streaming WebSocket API on 127.0.0.1.

Nothing here waits on time: each wait is for an event (a response, a fake's record, a health
change) with a deadline that fails saying what was seen.
"""
from __future__ import annotations

import asyncio
import subprocess
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.fakes.deepgram import FakeDeepgram
from support import START_S, tone
from voicemesh.v1 import common_pb2, stt_pb2, stt_pb2_grpc

WAIT_S = 60.0  # a liveness bound only
KEY = "dg-test-key-5f3a9c"  # what the fake accepts; must never appear in the service's log or Info
PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
MS = 32  # bytes per ms of PCM16 mono 16 kHz
R = stt_pb2.RecognizeRequest


@pytest.fixture(scope="module")
def fake():
    with FakeDeepgram(api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def service(fake, provider_services, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("deepgram-secret") / "api-key"
    key_file.write_text(KEY + "\n")
    env = {"VOICEMESH_STT_DEEPGRAM_ENDPOINT": fake.endpoint, "VOICEMESH_STT_DEEPGRAM_API_KEY_FILE": str(key_file),
           "DEEPGRAM_API_KEY": ""}
    return provider_services.start("stt", "deepgram", env)


class Call:
    """One Recognize call: requests written when the test says, responses read as they come."""

    def __init__(self, address: str, config: stt_pb2.SttConfig):
        self.channel = grpc.aio.insecure_channel(address)
        self.call = stt_pb2_grpc.SttServiceStub(self.channel).Recognize()
        self.config = config
        self.responses: list[stt_pb2.RecognizeResponse] = []
        self.status: grpc.StatusCode | None = None
        self.details = ""
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "Call":
        await self.call.write(R(config=self.config))
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self.call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.channel.close()

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.responses.append(response)
                self._changed.set()
            self.status = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            self.status, self.details = err.code(), err.details()
        finally:
            self._changed.set()

    async def write(self, request: stt_pb2.RecognizeRequest) -> None:
        """A write after the service ended the call (an error) is dropped: the status says why."""
        try:
            await self.call.write(request)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            await asyncio.wait_for(asyncio.shield(self._reader), WAIT_S)

    async def audio(self, seconds: float, chunk_ms: int = 100) -> int:
        pcm = tone(seconds).tobytes()
        step = chunk_ms * MS
        for begin in range(0, len(pcm), step):
            await self.write(R(audio=common_pb2.AudioChunk(data=pcm[begin:begin + step])))
        return len(pcm)

    async def turn_start(self, turn_id: str, offset_ms: int) -> None:
        await self.write(R(turn_start=common_pb2.TurnContext(turn_id=turn_id, audio_offset_ms=offset_ms)))

    async def finalize(self, turn_id: str) -> None:
        await self.write(R(finalize=stt_pb2.Finalize(turn_id=turn_id)))

    async def wait_for(self, predicate, what: str) -> stt_pb2.RecognizeResponse:
        seen = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while True:
            for response in self.responses[seen:]:
                if predicate(response):
                    return response
            seen = len(self.responses)
            if self.status is not None:
                raise AssertionError(f"call ended ({self.status}: {self.details}) before {what}; got {self.kinds()}")
            if loop.time() > deadline:
                raise AssertionError(f"waited {WAIT_S:.0f} s for {what}; got {self.kinds()}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                pass

    async def ended(self) -> tuple[grpc.StatusCode, str]:
        await asyncio.wait_for(asyncio.shield(self._reader), WAIT_S)
        return self.status, self.details

    def kinds(self) -> list[str]:
        out = []
        for response in self.responses:
            if response.HasField("transcript"):
                t = response.transcript
                out.append(f"{'final' if t.is_final else 'interim'}:{t.text!r}")
            else:
                out.append("end_of_utterance")
        return out


def is_final(turn_id: str):
    return lambda r: r.HasField("transcript") and r.transcript.is_final and r.transcript.turn_id == turn_id


def is_end(turn_id: str):
    return lambda r: r.HasField("end_of_utterance") and r.end_of_utterance.turn_id == turn_id


async def on_fake(fake: FakeDeepgram, kind: str, count: int = 1, where=None) -> list:
    return await asyncio.to_thread(fake.wait_for, kind, count, WAIT_S, where)


async def test_streams_interims_then_one_final_per_utterance(fake, service):
    fake.clear()
    async with Call(service.address, stt_pb2.SttConfig(format=PCM16_16K, interim_results=True)) as call:
        await call.turn_start("t1", 0)
        sent = await call.audio(1.2)
        interim = await call.wait_for(lambda r: r.HasField("transcript") and not r.transcript.is_final, "an interim")
        assert interim.transcript.text == "what"  # before any finalize: it streams as the audio goes
        await call.finalize("t1")
        final = (await call.wait_for(is_final("t1"), "the final of t1")).transcript
        assert final.text == "what is the capital of france"
        assert [w.text for w in final.words] == final.text.split()
        assert [(w.start_ms, w.end_ms) for w in final.words[:2]] == [(0, 200), (200, 400)]  # seconds -> ms
        assert final.words[0].confidence == pytest.approx(0.9) and final.confidence == pytest.approx(0.9)
        assert final.language == "en-US"
        await call.wait_for(is_end("t1"), "the end of t1")
        assert (await on_fake(fake, "closed"))[0] == sent  # CloseStream, then a normal close: all audio went
        auth, request = fake.seen("auth")[0], fake.seen("request")[0]
        assert auth == f"Token {KEY}"
        assert {k: v[0] for k, v in request.items()} == {
            "model": "nova-3", "language": "en-US", "encoding": "linear16", "sample_rate": "16000", "channels": "1",
            "interim_results": "true", "punctuate": "true", "smart_format": "true", "endpointing": "false"}
        assert len(fake.seen("finalize")) == 1 and len(fake.seen("close_stream")) == 1

        # A pause (not sent), then a second utterance on its own connection with 250 ms of preroll.
        await call.audio(1.0)
        await call.turn_start("t2", 2200)
        second = await call.audio(0.8)
        await call.finalize("t2")
        final2 = (await call.wait_for(is_final("t2"), "the final of t2")).transcript
        assert final2.words[0].start_ms == 2200 - 250  # times are the stream's, not the connection's
        await call.wait_for(is_end("t2"), "the end of t2")
        closed = await on_fake(fake, "closed", 2)
        assert closed[1] == second + 250 * MS  # the 1 s pause between the utterances never went upstream
        assert len(fake.seen("auth")) == 2
        await call.call.done_writing()
        assert await call.ended() == (grpc.StatusCode.OK, "")


async def test_cancel_closes_the_upstream_stream(fake, service):
    fake.clear()
    async with Call(service.address, stt_pb2.SttConfig(format=PCM16_16K, interim_results=True)) as call:
        await call.turn_start("t1", 0)
        await call.audio(0.5)
        await on_fake(fake, "audio")
        call.call.cancel()  # barge-in / hang-up: the caller goes away mid-utterance
        assert (await on_fake(fake, "cancelled"))[0] > 0
    assert fake.seen("close_stream") == [] and fake.seen("closed") == []


ERRORS = [  # error class, failures in a row (transient ones are retried at open: 3 attempts), status, message
    ("auth", 1, grpc.StatusCode.UNAUTHENTICATED, "Invalid credentials"),
    ("throttle", 3, grpc.StatusCode.RESOURCE_EXHAUSTED, "Too many requests"),
    ("not_found", 1, grpc.StatusCode.INVALID_ARGUMENT, "No such model/language"),
    ("bad_format", 1, grpc.StatusCode.INVALID_ARGUMENT, "could not be decoded"),
    ("unavailable", 3, grpc.StatusCode.UNAVAILABLE, "temporarily unavailable"),
]


def _recognize_once(address: str, config: stt_pb2.SttConfig) -> tuple[grpc.StatusCode, str, list]:
    """One utterance on the blocking API (its request thread never races the service's status)."""
    answered = threading.Event()
    kinds: list[str] = []

    def requests():
        yield R(config=config)
        yield R(turn_start=common_pb2.TurnContext(turn_id="t1", audio_offset_ms=0))
        pcm = tone(0.4).tobytes()
        for begin in range(0, len(pcm), 100 * MS):
            yield R(audio=common_pb2.AudioChunk(data=pcm[begin:begin + 100 * MS]))
        yield R(finalize=stt_pb2.Finalize(turn_id="t1"))
        # The end of the requests finalizes once more (a request of its own): only after t1 has
        # its answer, so that each failure asked of the fake goes to t1's opening.
        answered.wait(WAIT_S)

    with grpc.insecure_channel(address) as channel:
        try:
            for response in stt_pb2_grpc.SttServiceStub(channel).Recognize(requests(), timeout=WAIT_S):
                if response.HasField("transcript"):
                    t = response.transcript
                    kinds.append(f"{'final' if t.is_final else 'interim'}:{t.text!r}")
                else:
                    kinds.append("end_of_utterance")
                    answered.set()
        except grpc.RpcError as err:
            return err.code(), err.details(), kinds
        finally:
            answered.set()
    return grpc.StatusCode.OK, "", kinds


async def recognize_once(address: str, config: stt_pb2.SttConfig | None = None) -> tuple[grpc.StatusCode, str, list]:
    return await asyncio.to_thread(_recognize_once, address, config or stt_pb2.SttConfig(format=PCM16_16K))


@pytest.mark.parametrize("error_class, times, code, message", ERRORS, ids=[e[0] for e in ERRORS])
async def test_errors_map_to_status(fake, service, error_class, times, code, message):
    for _ in range(times):
        fake.fail_next(error_class)
    status, details, _ = await recognize_once(service.address)
    assert fake.take_failure() is None, "every failure asked for was used"
    assert status == code, details
    assert details.startswith("deepgram: ") and message in details


async def test_a_throttled_open_is_retried(fake, service):
    fake.fail_next("throttle")
    status, details, kinds = await recognize_once(service.address)
    assert status == grpc.StatusCode.OK, details
    assert "final:'what is the capital of france'" in kinds


async def test_unsupported_language_is_invalid_argument(fake, service):
    status, details, _ = await recognize_once(service.address, stt_pb2.SttConfig(format=PCM16_16K, language="xx-XX"))
    assert status == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("deepgram: ") and "'xx-XX'" in details
    assert fake.seen("request")[-1]["language"] == ["xx-XX"]


async def test_the_services_own_bad_input(service):
    bad_format = common_pb2.AudioFormat(encoding=9, sample_rate_hz=16000, channels=1)
    async with Call(service.address, stt_pb2.SttConfig(format=bad_format)) as call:
        status, details = await call.ended()  # refused at the config, before any audio
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "unsupported encoding" in details


async def test_mulaw_8k_in_is_sent_as_linear16_16k(fake, service):
    fake.clear()
    mulaw = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000, channels=1)
    async with Call(service.address, stt_pb2.SttConfig(format=mulaw)) as call:
        await call.turn_start("t1", 0)
        for _ in range(5):
            await call.call.write(R(audio=common_pb2.AudioChunk(data=b"\xff" * 800)))  # 100 ms of 8 kHz mu-law
        await call.finalize("t1")
        await call.wait_for(is_end("t1"), "the end of t1")
    # 16 kHz PCM16 upstream; the servicer's resampler still holds its delay (~85 ms) at the finalize
    assert 300 * MS < (await on_fake(fake, "closed"))[0] <= 500 * MS
    assert fake.seen("request")[0]["sample_rate"] == ["16000"]


def test_info_names_provider_model_endpoint_and_no_secret(fake, service):
    with grpc.insecure_channel(service.address) as channel:
        info = stt_pb2_grpc.SttServiceStub(channel).Info(stt_pb2.SttServiceInfoRequest(), timeout=10).info
    assert (info.provider, info.model) == ("deepgram", "nova-3")
    assert info.details["endpoint"] == fake.endpoint and info.details["language"] == "en-US"
    assert info.details["credentials"].endswith("api-key")  # where the key came from (the mounted file)
    assert KEY not in str(info)


async def test_no_secret_in_the_log(fake, service):
    fake.fail_next("auth")
    await recognize_once(service.address)  # a refusal, logged with its reason
    await recognize_once(service.address)
    log = service.log()
    assert "deepgram" in log and KEY not in log


async def test_self_hosted_probe_reads_status_without_a_key(fake, monkeypatch):
    from voicemesh.stt.providers.deepgram import DeepgramSettings, DeepgramSttProvider

    monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
    provider = DeepgramSttProvider(DeepgramSettings(endpoint=fake.endpoint, self_hosted=True))
    await provider.load()
    try:
        assert await provider.probe() is None
        fake.health = "Critical"
        assert "Critical" in await provider.probe()
    finally:
        fake.health = "Healthy"
        await provider.close()
    assert "Authorization" not in provider._headers()


async def test_keepalive_while_no_audio_flows(fake, monkeypatch):
    """Deepgram closes a connection that got nothing for 10 s: a quiet utterance is kept alive."""
    from voicemesh.stt.providers import deepgram
    from voicemesh.stt.providers.base import SttStreamConfig

    monkeypatch.setattr(deepgram, "KEEPALIVE_S", 0.05)
    monkeypatch.setenv("DEEPGRAM_API_KEY", KEY)
    provider = deepgram.DeepgramSttProvider(deepgram.DeepgramSettings(endpoint=fake.endpoint))
    await provider.load()
    fake.clear()
    stream = provider.open_stream(SttStreamConfig())
    try:
        await stream.turn_start("t1", 0)  # no audio at all
        await on_fake(fake, "keepalive")
    finally:
        await stream.abort()
        await provider.close()
    await on_fake(fake, "cancelled")


# --- health and startup: a service of their own -----------------------------------------------
async def _health_until(address: str, wanted: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        seen = []
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            async with asyncio.timeout(WAIT_S):
                async for response in watch:
                    seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
                    if response.status == wanted:
                        return
        except TimeoutError:
            raise AssertionError(f"health never became {wanted}; saw {seen}") from None
        finally:
            watch.cancel()


async def test_health_follows_the_probe(provider_services):
    with FakeDeepgram(api_key="dg-health-key") as own:
        env = {**own.env(), "VOICEMESH_STT_PROBE_SECONDS": "0.2"}
        service = provider_services.start("stt", "deepgram", env, name="stt-deepgram-health")
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert own.seen("probe")[0] == "/v1/projects"
        own.api_key = "rotated"  # the service's key is no longer accepted
        await _health_until(service.address, not_serving)
        assert "API key was refused" in service.log()
        own.api_key = "dg-health-key"
        await _health_until(service.address, serving)
        own.go_away()  # unreachable
        await _health_until(service.address, not_serving)
        own.come_back()
        await _health_until(service.address, serving)
        assert "dg-health-key" not in service.log()
        provider_services.stop(service)


def test_no_key_stops_the_service_at_startup(provider_services):
    service = provider_services.start("stt", "deepgram", {"VOICEMESH_STT_DEEPGRAM_ENDPOINT": "ws://127.0.0.1:9",
                                                          "DEEPGRAM_API_KEY": ""}, name="stt-deepgram-nokey", wait=False)
    try:
        code = service.proc.wait(timeout=START_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running without a key\n{service.log()}") from None
    assert code != 0
    assert "deepgram: no credential; set DEEPGRAM_API_KEY" in service.log()
