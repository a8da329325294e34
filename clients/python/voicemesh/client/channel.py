"""The connection to the orchestrator's public API (`OrchestratorService/Converse`): where it
is, how the channel is set up, and the first message of a session.

Depends only on grpcio and the generated stubs, so a client installs without any service.
"""
from __future__ import annotations

import asyncio
import os

import grpc

from voicemesh.v1 import common_pb2, orchestrator_pb2

ADDR_ENV = "VOICEMESH_ORCHESTRATOR_ADDR"
INPUT_RATE_HZ = 16000
OUTPUT_RATE_HZ = 24000
DEFAULT_PORT = 50051  # the orchestrator's default port (voicemesh.runtime.config.DEFAULT_PORTS)
MAX_MESSAGE_BYTES = 4 << 20
# Keepalive matches the servers' (20 s ping, 10 s to answer), so a dead peer is seen in 30 s.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 1),
]
pb = orchestrator_pb2
END_REQUEST = pb.ConverseRequest(control=pb.SessionControl(end=pb.EndSession()))
# Errors that mean the call is over (or was never usable): stop writing, the reader reports why.
WRITE_ERRORS = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


def default_addr() -> str:
    return os.environ.get(ADDR_ENV) or f"127.0.0.1:{DEFAULT_PORT}"


# Credentials (docs/security.md): an API key, sent as `authorization: Bearer <key>` on every call,
# and TLS to the orchestrator. Arguments of open_channel, else these env vars.
API_KEY_ENV, API_KEY_FILE_ENV = "VOICEMESH_API_KEY", "VOICEMESH_API_KEY_FILE"
TLS_ENV = "VOICEMESH_CLIENT_TLS_"  # + CA_FILE, CERT_FILE, KEY_FILE (mTLS), SERVER_NAME


def _read(path: str, what: str) -> bytes:
    try:
        return open(path, "rb").read()
    except OSError as err:
        raise ValueError(f"cannot read the {what} {path}: {err.strerror}") from None


def default_api_key() -> str | None:
    """VOICEMESH_API_KEY, else the content of the file VOICEMESH_API_KEY_FILE names, else None."""
    if key := os.environ.get(API_KEY_ENV, "").strip():
        return key
    if path := os.environ.get(API_KEY_FILE_ENV, "").strip():
        return _read(path, "API key file").decode().strip() or None
    return None


def tls_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """TLS to the orchestrator: `ca_file` signed its certificate (empty: the system's roots);
    `cert_file` and `key_file` are this client's own certificate, for an orchestrator with mTLS."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both cert_file and key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA certificate") if ca_file else None,
        private_key=_read(key_file, "client key") if key_file else None,
        certificate_chain=_read(cert_file, "client certificate") if cert_file else None,
    )


def _env_tls() -> tuple[grpc.ChannelCredentials | None, str]:
    ca, cert, key, name = (os.environ.get(TLS_ENV + part, "").strip() for part in ("CA_FILE", "CERT_FILE", "KEY_FILE",
                                                                                   "SERVER_NAME"))
    if not (ca or cert or key or name):
        return None, ""
    return tls_credentials(ca, cert, key), name


class KeyedChannel:
    """A channel whose every call carries the API key in its metadata. Added when the stub
    invokes a method: nothing per message, and it works on plaintext channels (where gRPC refuses
    call credentials), e.g. behind a proxy that terminates TLS."""

    def __init__(self, channel: grpc.aio.Channel, key: str):
        self._channel = channel
        self._auth = ("authorization", f"Bearer {key}")

    def __getattr__(self, name):
        attribute = getattr(self._channel, name)
        if name not in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return attribute
        auth = self._auth

        def factory(*args, **kwargs):
            method = attribute(*args, **kwargs)
            return lambda *a, metadata=None, **kw: method(*a, metadata=(*(metadata or ()), auth), **kw)

        return factory

    async def __aenter__(self) -> "KeyedChannel":
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()

    def __repr__(self) -> str:
        return f"KeyedChannel({self._channel!r})"  # never the key


def open_channel(addr: str, api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                 server_name: str = "") -> grpc.aio.Channel:
    """A channel to the orchestrator. `api_key` (else VOICEMESH_API_KEY / _FILE) goes on every
    call; `credentials` (from `tls_credentials`, else VOICEMESH_CLIENT_TLS_*) make it TLS;
    `server_name` checks the certificate against that name instead of the address's host."""
    if credentials is None:
        credentials, env_name = _env_tls()
        server_name = server_name or env_name
    options = [*CHANNEL_OPTIONS, *([("grpc.ssl_target_name_override", server_name)] if server_name else [])]
    if credentials is not None:
        channel = grpc.aio.secure_channel(addr, credentials, options=options)
    else:
        channel = grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
    key = api_key if api_key is not None else default_api_key()
    return KeyedChannel(channel, key) if key else channel


def config_request(
    system_prompt: str = "", voice: str = "", session_id: str = "", client: str = "voicemesh"
) -> orchestrator_pb2.ConverseRequest:
    """The first Converse message: PCM16 16 kHz mono in, PCM16 24 kHz mono out. An empty
    system prompt or voice leaves the choice to the orchestrator and the TTS."""
    pcm16 = common_pb2.AUDIO_ENCODING_PCM16
    return pb.ConverseRequest(
        config=pb.SessionConfig(
            session_id=session_id,
            system_prompt=system_prompt,
            voice=voice,
            input_format=common_pb2.AudioFormat(encoding=pcm16, sample_rate_hz=INPUT_RATE_HZ, channels=1),
            output_format=common_pb2.AudioFormat(encoding=pcm16, sample_rate_hz=OUTPUT_RATE_HZ, channels=1),
            interim_transcripts=True,
            metadata={"client": client},
        )
    )


async def wait_event(event: asyncio.Event, other: asyncio.Event, timeout: float | None) -> bool:
    """Wait for `event` unless `other` (the stream ending) comes first or time runs out."""
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(other.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
    return event.is_set()


