"""Process configuration: CLI flag, else VOICEMESH_<KIND>_<NAME>, else VOICEMESH_<NAME>, else default.

The per-kind env name lets one environment (a shell, a Kubernetes ConfigMap) configure
several services without collisions; the generic one sets a value for all of them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

DEFAULT_PORTS = {"orchestrator": 50051, "vad": 50052, "stt": 50053, "llm": 50054, "tts": 50055, "transport": 50056}
DEFAULT_PROVIDERS = {"vad": "silero", "stt": "whisper", "llm": "llamacpp", "tts": "hibari", "orchestrator": "default"}


def env_value(kind: str, name: str, default: str | None = None) -> str | None:
    """Look up VOICEMESH_<KIND>_<NAME>, then VOICEMESH_<NAME>."""
    specific = os.environ.get(f"VOICEMESH_{kind.upper()}_{name.upper()}")
    if specific not in (None, ""):
        return specific
    generic = os.environ.get(f"VOICEMESH_{name.upper()}")
    return generic if generic not in (None, "") else default


@dataclass
class ServeSettings:
    """Settings every service process shares. `help` metadata feeds the CLI and the README."""

    kind: str
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=0, metadata={"help": "port to bind (default per service)"})
    provider: str = field(default="", metadata={"help": "provider to run (default per service)"})
    max_message_bytes: int = field(default=4 << 20, metadata={"help": "largest gRPC message accepted or sent"})
    grace_seconds: float = field(default=10.0, metadata={"help": "how long open streams may finish after SIGTERM"})
    probe_seconds: float = field(default=15.0, metadata={"help": "how often a remote provider is checked for health"})
    keepalive_seconds: float = field(default=20.0, metadata={"help": "HTTP/2 keepalive ping interval"})
    max_concurrent_streams: int = field(default=1000, metadata={"help": "HTTP/2 streams per connection"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    log_format: str = field(default="json", metadata={"help": "json (structured) or text"})
    # Auth and TLS (docs/security.md). Paths of files, so a mounted Secret can hold them.
    api_keys_file: str = field(default="", metadata={"help": "SHA-256 digests of the API keys callers may use, one a line "
                                                             "(orchestrator; unset: open)"})
    tls_cert_file: str = field(default="", metadata={"help": "PEM certificate (chain) to serve TLS with"})
    tls_key_file: str = field(default="", metadata={"help": "PEM private key of tls_cert_file"})
    tls_client_ca_file: str = field(default="", metadata={"help": "PEM CA that client certificates must chain to (mTLS)"})
    health_port: int = field(default=0, metadata={"help": "also serve gRPC health alone, plaintext, on this port "
                                                          "(for kubelet probes of a TLS port); 0: no"})
    # The provider's own flags (--endpoint, --model, ...), name -> raw value; not a flag itself.
    provider_options: dict = field(default_factory=dict, metadata={"flag": False})

    @classmethod
    def load(cls, kind: str, overrides: dict[str, object] | None = None) -> "ServeSettings":
        values: dict[str, object] = {}
        for spec in fields(cls):
            if spec.name == "kind" or spec.metadata.get("flag") is False:
                continue
            raw = env_value(kind, spec.name)
            if raw is not None:
                values[spec.name] = type(spec.default)(raw) if not isinstance(spec.default, str) else raw
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
        settings = cls(kind=kind, **values)
        if not settings.port:
            settings.port = DEFAULT_PORTS[kind]
        if not settings.provider:
            settings.provider = DEFAULT_PROVIDERS.get(kind, "default")
        return settings

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def grpc_server_options(settings: ServeSettings) -> list[tuple[str, object]]:
    keepalive_ms = int(settings.keepalive_seconds * 1000)
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # A leftover server on the same port must fail loudly, not silently share calls.
        ("grpc.so_reuseport", 0),
        # Flow control that pushes back: with BDP probing gRPC grows each stream's receive window
        # to megabytes, so a server that falls behind (an overloaded orchestrator) buffers ~4 MB
        # of every caller's audio in its transport (the soak's 100 sessions: +700 MB) instead of
        # slowing the sender. The fixed 64 KB window is 2 s of 16 kHz audio, ample on loopback
        # (no throughput change measured) and 20x an audio stream's rate at 100 ms RTT.
        ("grpc.http2.bdp_probe", 0),
    ]


def grpc_channel_options(max_message_bytes: int = 4 << 20) -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 1),
        # A backend redeployed (a rollout, a provider swap) is found again within seconds, not
        # after gRPC's default reconnect backoff of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 5000),
        # As on the servers (grpc_server_options): a caller that falls behind reading its replies
        # (TTS audio, VAD events) holds a 64 KB window per stream, not megabytes.
        ("grpc.http2.bdp_probe", 0),
    ]
