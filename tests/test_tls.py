"""TLS and mTLS on every gRPC hop, with a CA made here (cryptography): the fake backends serve
mTLS, the orchestrator reaches them with its client certificate and serves mTLS itself, and a
client and the transport reach it over TLS. Health is also served alone, plaintext, on each
backend's health port (what a kubelet probe uses)."""
from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support import BACKENDS, START_S, ConverseProbe, Processes, event_is, free_port, wait_serving
from transport_harness import start_transport, ws_session
from voicemesh.runtime.fakes import FakeScript
from voicemesh.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
SERVER_NAME = "orchestrator.voicemesh.test"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class Authority:
    """A CA that signs leaf certificates, all written as PEM files under `directory`."""

    def __init__(self, directory: Path, name: str):
        self.directory, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = directory / f"{name}-ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common: str, server: bool) -> tuple[str, str]:
        """(cert file, key file) of a leaf for 127.0.0.1 / localhost / SERVER_NAME (server) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"), x509.DNSName(SERVER_NAME)]),
                critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = self.directory / f"{common}.crt", self.directory / f"{common}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_pem_key(key))
        return str(cert_file), str(key_file)


@dataclass
class TlsMesh:
    ca: Authority
    rogue: Authority  # a CA nobody trusts
    backends: dict[str, tuple[str, int]]  # kind -> (TLS address, plaintext health port)
    orchestrator: str
    client_cert: tuple[str, str]  # signed by `ca`
    rogue_client: tuple[str, str]
    transport: object


def _serve_env(cert: tuple[str, str], client_ca: Path | None, kind: str) -> dict[str, str]:
    prefix = f"VOICEMESH_{kind.upper()}_"
    env = {prefix + "TLS_CERT_FILE": cert[0], prefix + "TLS_KEY_FILE": cert[1]}
    if client_ca is not None:
        env[prefix + "TLS_CLIENT_CA_FILE"] = str(client_ca)
    return env


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls")
    ca, rogue = Authority(base, "voicemesh"), Authority(base, "rogue")
    server_cert, client_cert = ca.issue("server", server=True), ca.issue("client", server=False)
    procs = Processes(base)
    try:
        backends, started = {}, []
        for kind in BACKENDS:
            port, health_port = free_port(), free_port()
            env = {**_serve_env(server_cert, ca.ca_file, kind), f"VOICEMESH_{kind.upper()}_HEALTH_PORT": str(health_port)}
            started.append((procs.serve_fake(kind, port, FakeScript(), env), health_port))
            backends[kind] = (f"127.0.0.1:{port}", health_port)
        for proc, health_port in started:  # the plaintext health port says when each is SERVING
            wait_serving(f"127.0.0.1:{health_port}", proc, timeout=START_S)
        port, health_port = free_port(), free_port()
        env = {**{f"VOICEMESH_{kind.upper()}_ADDR": address for kind, (address, _) in backends.items()},
               "VOICEMESH_BACKEND_TLS_CA_FILE": str(ca.ca_file), "VOICEMESH_BACKEND_TLS_CERT_FILE": client_cert[0],
               "VOICEMESH_BACKEND_TLS_KEY_FILE": client_cert[1], **_serve_env(server_cert, ca.ca_file, "orchestrator"),
               "VOICEMESH_ORCHESTRATOR_HEALTH_PORT": str(health_port)}
        proc = procs.serve("orchestrator", port, env)
        wait_serving(f"127.0.0.1:{health_port}", proc, timeout=START_S)
        orchestrator = f"127.0.0.1:{port}"
        transport = start_transport(procs, orchestrator, env={
            "VOICEMESH_TRANSPORT_CLIENT_TLS_CA_FILE": str(ca.ca_file), "VOICEMESH_TRANSPORT_CLIENT_TLS_CERT_FILE": client_cert[0],
            "VOICEMESH_TRANSPORT_CLIENT_TLS_KEY_FILE": client_cert[1]})
        yield TlsMesh(ca, rogue, backends, orchestrator, client_cert, rogue.issue("rogue-client", server=False), transport)
    finally:
        procs.stop_all()


def _credentials(ca: Authority, cert: tuple[str, str] | None = None) -> grpc.ChannelCredentials:
    from voicemesh.client.channel import tls_credentials

    return tls_credentials(str(ca.ca_file), *(cert or ("", "")))


async def _health(address: str, credentials: grpc.ChannelCredentials | None, options=()) -> int | grpc.StatusCode:
    """The health status, or the status code of the failure (a refused handshake is UNAVAILABLE)."""
    channel = (grpc.aio.secure_channel(address, credentials, options=list(options)) if credentials is not None
               else grpc.aio.insecure_channel(address))
    try:
        return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)).status
    except grpc.aio.AioRpcError as err:
        return err.code()
    finally:
        await channel.close()


async def test_session_over_tls_end_to_end(tls_mesh):
    """Client -> orchestrator (mTLS) -> every backend (mTLS): a text turn, spoken and answered."""
    from voicemesh.client import open_channel

    channel = open_channel(tls_mesh.orchestrator, credentials=_credentials(tls_mesh.ca, tls_mesh.client_cert))
    try:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        info = await stub.Info(pb.OrchestratorServiceInfoRequest(), timeout=30)
        assert sorted(service.service for service in info.services) == sorted(BACKENDS)  # each reached over mTLS
    finally:
        await channel.close()
    probe = ConverseProbe(tls_mesh.orchestrator)
    await probe.channel.close()  # the probe's plaintext channel swapped for a TLS one
    probe.channel = grpc.aio.secure_channel(tls_mesh.orchestrator, _credentials(tls_mesh.ca, tls_mesh.client_cert))
    probe.call = orchestrator_pb2_grpc.OrchestratorServiceStub(probe.channel).Converse()
    async with probe:
        await probe.send_text("over tls")
        await probe.wait_for(event_is("turn_ended", turn_number=1))
    assert any("over tls" in text.text for text in probe.of("bot_text")) and probe.audio_bytes(), probe.kinds()


async def test_plaintext_to_a_tls_port_fails(tls_mesh):
    for address in (tls_mesh.orchestrator, *(address for address, _ in tls_mesh.backends.values())):
        assert await _health(address, None) == grpc.StatusCode.UNAVAILABLE, address


async def test_mtls_refuses_clients_without_a_trusted_certificate(tls_mesh):
    ca = tls_mesh.ca
    for address in (tls_mesh.orchestrator, tls_mesh.backends["stt"][0]):
        assert await _health(address, _credentials(ca)) == grpc.StatusCode.UNAVAILABLE, address  # no client cert
        assert await _health(address, _credentials(ca, tls_mesh.rogue_client)) == grpc.StatusCode.UNAVAILABLE, address
        assert await _health(address, _credentials(ca, tls_mesh.client_cert)) == SERVING, address
    # A client that does not trust the server's CA refuses the server, whatever it presents.
    rogue_trust = _credentials(tls_mesh.rogue, tls_mesh.client_cert)
    assert await _health(tls_mesh.orchestrator, rogue_trust) == grpc.StatusCode.UNAVAILABLE
    # The server name override: the certificate is checked against that name, not the address.
    named = (("grpc.ssl_target_name_override", SERVER_NAME),)
    assert await _health(tls_mesh.orchestrator, _credentials(ca, tls_mesh.client_cert), named) == SERVING
    wrong = (("grpc.ssl_target_name_override", "elsewhere.test"),)
    assert await _health(tls_mesh.orchestrator, _credentials(ca, tls_mesh.client_cert), wrong) == grpc.StatusCode.UNAVAILABLE


async def test_health_port_is_plaintext_and_health_only(tls_mesh):
    _, health_port = tls_mesh.backends["tts"]
    assert await _health(f"127.0.0.1:{health_port}", None) == SERVING
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the service itself is not on the health port
            await orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Info(pb.OrchestratorServiceInfoRequest(), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_transport_reaches_the_orchestrator_over_mtls(tls_mesh):
    async with ws_session(tls_mesh.transport.ws_url + "/ws") as client:
        await client.ws.send_str(json.dumps({"type": "start"}))
        await client.wait_for(lambda e: e.get("type") == "session_started")
        await client.ws.send_str(json.dumps({"type": "text", "text": "via the transport"}))
        text = await client.wait_for(lambda e: e.get("type") == "bot_text")
    assert "via the transport" in text["text"]
    async with aiohttp.ClientSession() as http, http.get(tls_mesh.transport.http_url + "/healthz") as reply:
        assert reply.status == 200


def _replace(path: str, source: str) -> None:
    """Put `source`'s bytes at `path` the way a Secret volume updates: a whole new file swapped in."""
    staging = Path(path + ".new")
    staging.write_bytes(Path(source).read_bytes())
    staging.replace(path)


async def test_rotated_certificate_is_served_without_a_restart(tmp_path):
    """cert-manager renews a mounted certificate in place: the next connection gets the new one,
    and a rotation that does not load (key not matching) keeps the one in force."""
    old_ca, new_ca = Authority(tmp_path, "old"), Authority(tmp_path, "new")
    served = tmp_path / "served"
    served.mkdir()
    cert_file, key_file = str(served / "tls.crt"), str(served / "tls.key")
    first, second = old_ca.issue("first", server=True), new_ca.issue("second", server=True)
    _replace(cert_file, first[0])
    _replace(key_file, first[1])
    procs = Processes(tmp_path)
    try:
        port, health_port = free_port(), free_port()
        proc = procs.serve_fake("vad", port, FakeScript(), {"VOICEMESH_VAD_TLS_CERT_FILE": cert_file,
                                                            "VOICEMESH_VAD_TLS_KEY_FILE": key_file,
                                                            "VOICEMESH_VAD_HEALTH_PORT": str(health_port)})
        wait_serving(f"127.0.0.1:{health_port}", proc, timeout=START_S)
        address = f"127.0.0.1:{port}"
        fresh = (("grpc.use_local_subchannel_pool", 1),)  # a new connection per check, so a new handshake
        assert await _health(address, _credentials(old_ca), fresh) == SERVING
        assert await _health(address, _credentials(new_ca), fresh) == grpc.StatusCode.UNAVAILABLE

        _replace(cert_file, second[0])
        _replace(key_file, second[1])
        assert await _health(address, _credentials(new_ca), fresh) == SERVING
        assert await _health(address, _credentials(old_ca), fresh) == grpc.StatusCode.UNAVAILABLE

        _replace(key_file, first[1])  # a key that is not the certificate's: refused, the new pair stays
        assert await _health(address, _credentials(new_ca), fresh) == SERVING
        log = (tmp_path / "fake-vad.log").read_text(errors="replace")
        assert "TLS certificate reloaded" in log and "TLS certificate not reloaded" in log, log[-2000:]
    finally:
        procs.stop_all()
