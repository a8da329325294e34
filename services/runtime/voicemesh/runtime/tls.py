"""TLS and mTLS for gRPC, from PEM files.

Server side (ServeSettings): `tls_cert_file` + `tls_key_file` serve TLS; adding
`tls_client_ca_file` makes it mTLS: a client must present a certificate signed by that CA, or the
handshake fails before any call. Without a certificate the port stays plaintext, as before.
The files are re-read when they change (checked at each new connection, before its handshake), so
a certificate rotated in place (cert-manager renewing a mounted Secret) is served without a
restart; connections already open keep the certificate they started with. A rotated set that does
not load (unreadable, not PEM, key not matching the certificate) is logged and the one in force
stays.

Client side (`ChannelTls`, from env vars under a prefix): `<PREFIX>_TLS_CA_FILE` (the CA that
signed the server's certificate; unset: the system's roots), `<PREFIX>_TLS_CERT_FILE` +
`<PREFIX>_TLS_KEY_FILE` (the client's own certificate, for mTLS) and `<PREFIX>_TLS_SERVER_NAME`
(the name to check the server's certificate against, when the address is not that name, e.g.
an IP). Setting any of them makes the channel TLS. The prefixes:
- VOICEMESH_BACKEND: the orchestrator's channels to the VAD, STT, LLM and TTS;
- VOICEMESH_CLIENT: the SDK client's and the transport's channel to the orchestrator.
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("voicemesh.tls")
BACKEND_PREFIX = "VOICEMESH_BACKEND"
CLIENT_PREFIX = "VOICEMESH_CLIENT"


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SystemExit(f"TLS: cannot read the {what} {path}: {err.strerror}") from None
    if b"-----BEGIN" not in data:
        raise SystemExit(f"TLS: the {what} {path} is not PEM")
    return data


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials | None:
    """TLS server credentials (mTLS with `client_ca_file`) that follow the files as they are
    rotated; None when no certificate is set."""
    if not (cert_file or key_file):
        if client_ca_file:
            raise SystemExit("TLS: tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file too")
        return None
    if not (cert_file and key_file):
        raise SystemExit("TLS: set both tls_cert_file and tls_key_file")
    files = ServerCertificates(cert_file, key_file, client_ca_file)
    return grpc.dynamic_ssl_server_credentials(files.load(), files.fetch,
                                               require_client_authentication=bool(client_ca_file))


class ServerCertificates:
    """A server's certificate, key and client CA files, loaded again when any of them changes."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = ""):
        self.paths = tuple(p for p in (cert_file, key_file, client_ca_file) if p)
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._stamp: tuple | None = None
        self._lock = threading.Lock()

    def _stamps(self) -> tuple:
        # stat follows symlinks: a Secret volume's atomic swap shows as a new inode
        return tuple((info.st_ino, info.st_mtime_ns, info.st_size) for info in map(os.stat, self.paths))

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The configuration in the files now; SystemExit saying what is wrong if they do not load."""
        try:
            stamp = self._stamps()
        except OSError:
            stamp = None  # _read below says which file is missing
        pair = (_read(self.key_file, "private key"), _read(self.cert_file, "certificate"))
        client_ca = _read(self.client_ca_file, "client CA") if self.client_ca_file else None
        try:  # a key that does not match its certificate would fail every handshake: refuse it here
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as err:
            raise SystemExit(f"TLS: {self.cert_file} and {self.key_file} do not load as a pair: {err}") from None
        # load_cert_chain read the files again: if they changed in between, what was checked is
        # not what was read; leave the stamp, so the next connection loads them afresh.
        if (_read(self.key_file, "private key"), _read(self.cert_file, "certificate")) != pair:
            raise SystemExit(f"TLS: {self.cert_file} changed while it was being loaded")
        self._stamp = stamp
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC calls this before each new connection's handshake: a new configuration when the
        files changed and load, else None (keep the one in force)."""
        try:
            stamp = self._stamps()
        except OSError:
            return None  # a file mid-swap or gone: keep serving what we have
        if stamp == self._stamp:
            return None
        with self._lock:
            if stamp == self._stamp:
                return None
            try:
                config = self.load()
            except SystemExit as err:
                if "changed while" not in str(err):
                    self._stamp = stamp  # one warning per change
                log.warning("TLS certificate not reloaded, keeping the one in force: %s", err)
                return None
            log.info("TLS certificate reloaded", extra={"cert_file": self.cert_file})
            return config


@dataclass(frozen=True)
class ChannelTls:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    @classmethod
    def from_env(cls, prefix: str, environ=os.environ) -> "ChannelTls":
        return cls(*(environ.get(f"{prefix}_TLS_{name}", "").strip() for name in ("CA_FILE", "CERT_FILE", "KEY_FILE",
                                                                                   "SERVER_NAME")))

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file or self.server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert_file) != bool(self.key_file):
            raise SystemExit("TLS: a client certificate needs both its cert and key files")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA certificate") if self.ca_file else None,
            private_key=_read(self.key_file, "client private key") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "client certificate") if self.cert_file else None,
        )

    def options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def aio_channel(address: str, options: list[tuple[str, object]], tls: ChannelTls | None = None,
                interceptors=None) -> grpc.aio.Channel:
    """A grpc.aio channel: TLS when `tls` is enabled, plaintext otherwise."""
    if tls is not None and tls.enabled:
        return grpc.aio.secure_channel(address, tls.credentials(), options=[*options, *tls.options()],
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


class KeyedChannel:
    """A grpc.aio channel whose every call carries `authorization: Bearer <key>`.

    The key is added to each call's metadata when the stub invokes it, which costs nothing per
    message (a grpc.aio client interceptor would proxy every write through a queue), and works on
    plaintext channels too, where gRPC refuses call credentials. Everything else is the channel's."""

    def __init__(self, channel: grpc.aio.Channel, key: str):
        self._channel = channel
        self._auth = ("authorization", f"Bearer {key}")

    def _keyed(self, make):
        def factory(*args, **kwargs):
            callable_ = make(*args, **kwargs)
            auth = self._auth

            def call(*call_args, metadata=None, **call_kwargs):
                return callable_(*call_args, metadata=(*(metadata or ()), auth), **call_kwargs)

            return call

        return factory

    def __getattr__(self, name):
        attribute = getattr(self._channel, name)
        if name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return self._keyed(attribute)
        return attribute

    async def __aenter__(self) -> "KeyedChannel":
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()

    def __repr__(self) -> str:
        return f"KeyedChannel({self._channel!r})"  # never the key
