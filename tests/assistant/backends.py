"""What the assistant's tool tests share: a context with a clock that moves only when told,
and a real SMTP server (aiosmtpd) on 127.0.0.1 that records what it receives."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from voicemesh.assistant.toolkit import Context, Tool

PARIS = ZoneInfo("Europe/Paris")
UTC = ZoneInfo("UTC")


class Clock:
    """ctx.now for tests: fixed until advanced."""

    def __init__(self, start: datetime) -> None:
        self.current = start

    def __call__(self) -> datetime:
        return self.current

    def advance(self, **delta: float) -> datetime:
        self.current += timedelta(**delta)
        return self.current


def make_ctx(tmp_path: Path, tz: ZoneInfo = PARIS, now: datetime | None = None, **settings: str) -> Context:
    """A Context on a fresh data folder; the clock (ctx.now) is a Clock, Tuesday 1 December 2026 10:00 local by default."""
    clock = Clock(now or datetime(2026, 12, 1, 10, 0, tzinfo=tz))
    return Context(data_dir=tmp_path, tz=tz, now=clock, settings=dict(settings))


def tool(tools: list[Tool], name: str) -> Tool:
    return next(item for item in tools if item.name == name)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Mailbox:
    """What the SMTP server accepted, and the address it listens on."""
    port: int
    received: list[Envelope] = field(default_factory=list)
    refuse: tuple[str, ...] = ()  # recipients answered 550
    logins: dict[str, str] = field(default_factory=dict)  # if set, AUTH is offered and checked

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # aiosmtpd calls its hooks by these names
        if address in self.refuse:
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.received.append(envelope)
        return "250 Message accepted for delivery"

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and self.logins.get(auth_data.login.decode()) == auth_data.password.decode()
        return AuthResult(success=ok, handled=False)


def server_tls(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA made here (its PEM file, for the client to trust) and a server context with a
    certificate it signed for 127.0.0.1."""
    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
          .not_valid_after(now + timedelta(days=1)).add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name("mail.test")).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.crt", directory / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return ca_file, context


@asynccontextmanager
async def smtp_server(refuse: tuple[str, ...] = (), logins: dict[str, str] | None = None,
                      tls: ssl.SSLContext | None = None) -> AsyncIterator[Mailbox]:
    """A real SMTP server on the test's own loop (the client runs in a thread, as the tool does).
    With `tls` it demands STARTTLS before anything else, and logins only over TLS."""
    loop = asyncio.get_running_loop()
    mailbox = Mailbox(0, refuse=refuse, logins=logins or {})
    options: dict = {"authenticator": mailbox.authenticate, "auth_require_tls": tls is not None} if logins else {}
    if tls:
        options |= {"tls_context": tls, "require_starttls": True}
    server = await loop.create_server(lambda: SMTP(mailbox, hostname="localhost", loop=loop, **options), "127.0.0.1", 0)
    mailbox.port = server.sockets[0].getsockname()[1]
    try:
        yield mailbox
    finally:
        server.close()
        await server.wait_closed()
