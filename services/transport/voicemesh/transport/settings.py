"""Transport settings: VOICEMESH_TRANSPORT_<NAME>, else VOICEMESH_<NAME>, else the default.

The gRPC side (port, grace, logs) comes from the shared ServeSettings; these are the HTTP,
WebSocket, WebRTC and telephony settings only the transport has.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from voicemesh.runtime.config import DEFAULT_PORTS, env_value
from voicemesh.runtime.tls import ChannelTls

DEFAULT_HTTP_PORT = 8080


@dataclass
class TransportSettings:
    http_host: str = "127.0.0.1"  # where the page, /api/offer and the WebSockets listen
    http_port: int = DEFAULT_HTTP_PORT
    orchestrator_addr: str = f"127.0.0.1:{DEFAULT_PORTS['orchestrator']}"
    max_connections: int = 100  # open connections of every protocol together
    max_message_bytes: int = 256 * 1024  # largest WebSocket message or HTTP body
    idle_timeout_seconds: float = 30.0  # no message (or WebRTC audio) for this long: close
    # WebRTC host candidates: comma-separated IP addresses or interface names. Empty: the
    # HTTP host's address (loopback stays on loopback); for a wildcard host, every non-loopback
    # address of the machine.
    ice_interfaces: str = ""
    system_prompt: str = ""  # empty: the client's default prompt
    voice: str = ""
    # Telephony hang-up when a session ends. Without credentials the media WebSocket is
    # closed and the carrier moves on to its next instruction.
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    twilio_api_base: str = "https://api.twilio.com"
    telnyx_api_key: str = ""
    telnyx_api_base: str = "https://api.telnyx.com"
    # Security (docs/security.md). Callers: digests of the keys they may use (voicemesh.runtime.auth;
    # unset: open), Twilio's signature required on /twilio, the URL callers use (for the signature).
    api_keys_file: str = ""
    twilio_verify_signature: bool = False
    public_url: str = ""  # e.g. wss://voice.example.com; empty: rebuilt from each request
    # Toward the orchestrator: this transport's own key (a file: a mounted Secret) and TLS.
    orchestrator_key_file: str = ""
    client_tls_ca_file: str = ""
    client_tls_cert_file: str = ""  # with client_tls_key_file: mTLS
    client_tls_key_file: str = ""
    client_tls_server_name: str = ""

    @classmethod
    def load(cls) -> "TransportSettings":
        values: dict[str, object] = {}
        for spec in fields(cls):
            raw = env_value("transport", spec.name)
            if raw is not None:
                values[spec.name] = raw if isinstance(spec.default, str) else _convert(raw, spec.default, spec.name)
        # The orchestrator address follows the mesh convention VOICEMESH_ORCHESTRATOR_ADDR.
        if "orchestrator_addr" not in values and os.environ.get("VOICEMESH_ORCHESTRATOR_ADDR"):
            values["orchestrator_addr"] = os.environ["VOICEMESH_ORCHESTRATOR_ADDR"]
        # Credentials may also come under the carriers' own env names.
        for name, env in (("twilio_account_sid", "TWILIO_ACCOUNT_SID"), ("twilio_auth_token", "TWILIO_AUTH_TOKEN"),
                          ("telnyx_api_key", "TELNYX_API_KEY")):
            if name not in values and os.environ.get(env):
                values[name] = os.environ[env]
        settings = cls(**values)
        if settings.max_connections < 1 or settings.max_message_bytes < 1024 or settings.idle_timeout_seconds <= 0:
            raise SystemExit("transport: max_connections >= 1, max_message_bytes >= 1024 and idle_timeout_seconds > 0 required")
        return settings

    def orchestrator_tls(self) -> ChannelTls:
        return ChannelTls(self.client_tls_ca_file, self.client_tls_cert_file, self.client_tls_key_file,
                          self.client_tls_server_name)

    @property
    def http_url(self) -> str:
        host = "127.0.0.1" if self.http_host in ("0.0.0.0", "::", "") else self.http_host
        return f"http://{host}:{self.http_port}"


def _convert(raw: str, default: object, name: str) -> object:
    if isinstance(default, bool):  # bool("false") is True
        if raw.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise SystemExit(f"transport: {name} must be true or false, got {raw!r}")
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return type(default)(raw)
