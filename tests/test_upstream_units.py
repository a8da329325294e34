"""What every remote provider shares (voicemesh.runtime.upstream), the health that follows a
provider's probe (server._watch_provider), and the supervisor's health check read through
grpcio-testing: in process, no socket, because none would add anything."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import grpc
import grpc_testing
import pytest
from grpc_health.v1 import health_pb2

from voicemesh.cli.mesh import is_serving
from voicemesh.runtime import errors
from voicemesh.runtime.provider import Provider, ProviderInfo
from voicemesh.runtime.server import _watch_provider
from voicemesh.runtime.upstream import Secret, http_error, load_settings, open_with_retry, read_secret


@dataclass
class _Settings:
    endpoint: str = field(default="https://example.invalid", metadata={"help": "where"})
    use_tls: bool = True
    sample_rate_hz: int = 16000
    speed: float = 1.0


def test_settings_come_from_the_provider_env_then_flags(monkeypatch):
    monkeypatch.setenv("VOICEMESH_STT_ENDPOINT", "kind-wide:1")  # not the provider's: ignored
    monkeypatch.setenv("VOICEMESH_STT_RIVA_USE_TLS", "false")
    monkeypatch.setenv("VOICEMESH_STT_RIVA_SAMPLE_RATE_HZ", "8000")
    settings = load_settings("stt", "riva", _Settings, {"speed": "1.5"})
    assert settings == _Settings(use_tls=False, sample_rate_hz=8000, speed=1.5)
    monkeypatch.setenv("VOICEMESH_STT_RIVA_ENDPOINT", "riva-only:2")
    assert load_settings("stt", "riva", _Settings).endpoint == "riva-only:2"
    assert load_settings("stt", "deepgram", _Settings).endpoint == _Settings().endpoint  # one provider's stays its own
    assert load_settings("stt", "riva", _Settings, {"endpoint": "flag:3"}).endpoint == "flag:3"
    monkeypatch.setenv("VOICEMESH_LLM_AZURE_OPENAI_ENDPOINT", "azure:4")
    assert load_settings("llm", "azure-openai", _Settings).endpoint == "azure:4"


def test_bad_settings_say_which_variable(monkeypatch):
    monkeypatch.setenv("VOICEMESH_TTS_POLLY_SAMPLE_RATE_HZ", "fast")
    with pytest.raises(SystemExit, match="VOICEMESH_TTS_POLLY_SAMPLE_RATE_HZ: sample_rate_hz must be a int"):
        load_settings("tts", "polly", _Settings)
    with pytest.raises(SystemExit, match="--use-tls: use_tls must be true or false"):
        load_settings("tts", "polly", _Settings, {"use_tls": "maybe"})


def test_secrets_come_from_a_file_first_and_never_print(tmp_path, monkeypatch):
    monkeypatch.setenv("VENDOR_KEY", "env-secret-value")
    key_file = tmp_path / "key"
    key_file.write_text("file-secret-value\n")
    secret = read_secret(str(key_file), ("VENDOR_KEY",), "vendor")
    assert secret.reveal() == "file-secret-value"
    from_env = read_secret("", ("OTHER_KEY", "VENDOR_KEY"), "vendor")
    assert from_env.reveal() == "env-secret-value" and from_env.source == "VENDOR_KEY"
    for shown in (str(secret), repr(secret), f"{secret}", str([secret])):
        assert "secret-value" not in shown
    monkeypatch.delenv("VENDOR_KEY")
    with pytest.raises(SystemExit, match="set OTHER_KEY or VENDOR_KEY"):
        read_secret("", ("OTHER_KEY", "VENDOR_KEY"), "vendor")
    assert read_secret("", ("OTHER_KEY",), "vendor", required=False) is None
    with pytest.raises(SystemExit, match="cannot read the key file"):
        read_secret(str(tmp_path / "missing"), ("OTHER_KEY",), "vendor")


@pytest.mark.parametrize("status, error", [
    (400, errors.InvalidInput), (401, errors.Unauthenticated), (403, errors.PermissionDenied),
    (404, errors.NotFound), (408, errors.DeadlineExceeded), (429, errors.ResourceExhausted),
    (500, errors.Unavailable), (503, errors.Unavailable), (504, errors.DeadlineExceeded),
])
def test_http_statuses_map_to_errors_naming_the_provider(status, error):
    err = http_error("vendor", status, "the detail", "check VENDOR_KEY")
    assert type(err) is error
    assert err.message == f"vendor: the detail (upstream HTTP {status}); check VENDOR_KEY"


async def test_opening_is_retried_on_transient_errors_only():
    attempts: list[int] = []

    async def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise errors.Unavailable("vendor: down")
        return "opened"

    assert await open_with_retry(flaky, "vendor", base_delay_s=0.0) == "opened" and len(attempts) == 3

    async def refused():
        attempts.append(1)
        raise errors.Unauthenticated("vendor: bad key")

    attempts.clear()
    with pytest.raises(errors.Unauthenticated):
        await open_with_retry(refused, "vendor", base_delay_s=0.0)
    assert len(attempts) == 1  # a bad key does not get better by asking again

    async def always_down():
        attempts.append(1)
        raise errors.Unavailable("vendor: down")

    attempts.clear()
    with pytest.raises(errors.Unavailable):
        await open_with_retry(always_down, "vendor", attempts=4, base_delay_s=0.0)
    assert len(attempts) == 4


class _RemoteProvider(Provider):
    name = "remote"

    def __init__(self):
        self.reasons: asyncio.Queue = asyncio.Queue()  # what each probe answers, in order
        self.idle = asyncio.Event()  # every answer given and acted on: the next probe waits

    async def load(self) -> None:
        pass

    def info(self) -> ProviderInfo:
        return ProviderInfo(provider="remote", model="m")

    async def probe(self) -> str | None:
        if self.reasons.empty():
            self.idle.set()
        reason = await self.reasons.get()
        self.idle.clear()
        if isinstance(reason, Exception):
            raise reason
        return reason


async def test_health_follows_the_provider_probe():
    """SERVING from the first passing probe; a serving replica needs two failures in a row to turn
    NOT_SERVING (one blip ejects nobody); one pass brings it back; nothing is set without a change."""
    provider = _RemoteProvider()
    stop = asyncio.Event()
    changes: list[int] = []

    async def set_health(status: int) -> None:
        changes.append(status)

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    answers = ["down at start", None, "blip", None, "bad key", "bad key", "still bad", None,
               RuntimeError("connection refused"), "refused", None]
    for answer in answers:
        provider.reasons.put_nowait(answer)
    watcher = asyncio.create_task(_watch_provider(provider, set_health, 0.0, stop))
    try:
        await asyncio.wait_for(provider.idle.wait(), 30)
        # down at start, up, a blip ignored, two bad keys in a row, back, two failures in a row, back
        assert changes == [not_serving, serving, not_serving, serving, not_serving, serving], (answers, changes)
    finally:
        stop.set()
        await provider.reasons.put(None)
        await asyncio.wait_for(watcher, 30)


def _answer_health(channel: grpc_testing.Channel, status=None, code=grpc.StatusCode.OK) -> None:
    check = health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]
    _, request, rpc = channel.take_unary_unary(check)
    assert request.service == ""
    response = health_pb2.HealthCheckResponse(status=status or 0)
    rpc.terminate(response, (), code, "")


@pytest.mark.parametrize("status, code, expected", [
    (health_pb2.HealthCheckResponse.SERVING, grpc.StatusCode.OK, True),
    (health_pb2.HealthCheckResponse.NOT_SERVING, grpc.StatusCode.OK, False),
    (None, grpc.StatusCode.UNAVAILABLE, False),
])
def test_the_supervisor_reads_health(status, code, expected):
    channel = grpc_testing.channel(health_pb2.DESCRIPTOR.services_by_name.values(), grpc_testing.strict_real_time())
    result: list[bool] = []
    caller = threading.Thread(target=lambda: result.append(is_serving(channel)))
    caller.start()
    _answer_health(channel, status, code)
    caller.join(30)
    assert result == [expected]


def test_secret_in_an_fstring_or_log_args_stays_hidden(caplog):
    import logging

    secret = Secret("sk-live-123", "VENDOR_KEY")
    logging.getLogger("voicemesh.test").warning("using %s and %r", secret, secret)
    assert "sk-live-123" not in caplog.text and "VENDOR_KEY" in caplog.text
