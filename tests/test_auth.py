"""API keys on Converse and on the transport (docs/security.md), against real processes: the fake
mesh with a key file on the orchestrator, and a transport that requires keys of its callers and
holds its own key toward the orchestrator."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from support import ConverseProbe, Processes, event_is, fake_mesh
from transport_harness import WsClient, start_transport
from voicemesh.runtime.auth import MISSING, WRONG, KeyStore, digest, parse_key_file
from voicemesh.runtime.fakes import FakeScript
from voicemesh.transport.callers import twilio_signature, verify_telnyx, verify_twilio
from voicemesh.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc

KEY_A, KEY_B = "vm-key-alpha-7f3c9e", "vm-key-bravo-2d8a41"
CALLER_KEY = "vm-caller-key-5b1e"  # what browsers and phones present to the transport
TWILIO_TOKEN = "twilio-auth-token-test"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def write_atomically(path: Path, text: str) -> None:
    """As a Kubernetes Secret update does: a new file renamed over the old one."""
    staged = path.with_suffix(".new")
    staged.write_text(text)
    os.replace(staged, path)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """(orchestrator address, its key file, log dir, transport): the orchestrator requires KEY_A;
    the transport requires CALLER_KEY (or Twilio's signature) and sends KEY_A."""
    base = tmp_path_factory.mktemp("auth")
    keys = base / "api-keys"
    keys.write_text(f"# the orchestrator's callers\n{digest(KEY_A)}\n")
    (base / "caller-keys").write_text(digest(CALLER_KEY) + "\n")
    (base / "transport-key").write_text(KEY_A + "\n")
    procs = Processes(base)
    try:
        mesh = fake_mesh(procs, FakeScript(), env={"VOICEMESH_ORCHESTRATOR_API_KEYS_FILE": str(keys)})
        transport = start_transport(procs, mesh.orchestrator_address, env={
            "VOICEMESH_TRANSPORT_API_KEYS_FILE": str(base / "caller-keys"),
            "VOICEMESH_TRANSPORT_ORCHESTRATOR_KEY_FILE": str(base / "transport-key"),
            "TWILIO_AUTH_TOKEN": TWILIO_TOKEN, "VOICEMESH_TRANSPORT_TWILIO_VERIFY_SIGNATURE": "true"})
        keyless = start_transport(procs, mesh.orchestrator_address, name="transport-keyless")
        yield mesh.orchestrator_address, keys, base / "fake-mesh", transport, keyless
    finally:
        procs.stop_all()


# -- the key file and the hashing command ---------------------------------------------------------

def test_key_file_holds_digests_only(tmp_path):
    assert parse_key_file(f"# comment\n\n{digest(KEY_A)}  # current\n{digest(KEY_B).upper()}\n", "f") == (
        digest(KEY_A), digest(KEY_B))
    with pytest.raises(ValueError, match="line 1: not a SHA-256 hex digest") as err:
        parse_key_file(KEY_A, "f")
    assert KEY_A not in str(err.value)  # the message names the line, never its content
    path = tmp_path / "keys"
    path.write_text(digest(KEY_A))
    store = KeyStore(str(path))
    assert store.check(KEY_A) and not store.check(KEY_B) and not store.check("")
    # The check runs once per call: measured here, printed for the reliability table.
    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        store.check_header(f"Bearer {KEY_A}")
    print(f"key check: {(time.perf_counter() - started) / rounds * 1e6:.1f} us per call (stat + sha256 + compare)")


def test_hash_command_prints_the_digest_a_key_file_takes():
    done = subprocess.run([sys.executable, "-m", "voicemesh.runtime.auth", "hash"], input=f"{KEY_A}\n{KEY_B}\n",
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == [digest(KEY_A), digest(KEY_B)]
    made = subprocess.run([sys.executable, "-m", "voicemesh.runtime.auth", "new"], capture_output=True, text=True,
                          timeout=60, check=True).stdout.split()
    assert made[0] == "key:" and made[2] == "digest:" and made[3] == digest(made[1])


# -- Converse ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata, expected", [
    ((), "missing credential"),
    (bearer(KEY_B), "invalid API key"),
    ((("authorization", KEY_A),), "malformed credential"),  # the key without "Bearer"
], ids=["no-key", "wrong-key", "malformed"])
async def test_converse_refused_without_the_right_key(keyed, metadata, expected):
    address, _, logs, *_ = keyed
    before = _log_count(logs / "orchestrator.log", "session started")
    code, details, events = await converse_once(address, metadata)
    assert code == UNAUTH and expected in details, (code, details)
    assert events == []  # not even SessionStarted: the handler never ran
    assert KEY_A not in details and KEY_B not in details
    assert _log_count(logs / "orchestrator.log", "session started") == before


async def converse_once(address: str, metadata) -> tuple[grpc.StatusCode, str, list]:
    """Open Converse, send a config, half-close, read to the end: (status, details, events).
    Through the sync API: a grpc.aio write that races the server's refusal records its own
    INTERNAL over the server's status; the sync client's request thread does not."""

    def call() -> tuple[grpc.StatusCode, str, list]:
        with grpc.insecure_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            responses = stub.Converse(iter([pb.ConverseRequest(config=pb.SessionConfig())]),
                                      metadata=metadata or None, timeout=60)
            events = []
            try:
                events.extend(responses)
            except grpc.RpcError as err:
                return err.code(), err.details(), events
            return grpc.StatusCode.OK, "", events

    return await asyncio.to_thread(call)


async def test_a_refused_converse_takes_the_first_write_and_answers_with_its_status(keyed):
    """The refusal waits for the caller's first message, so a grpc.aio client's config write
    never races it (a write the refusal overtakes reports INTERNAL in grpc.aio); a caller that
    half-closes at once, or says nothing, is refused all the same."""
    address, *_ = keyed
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        for attempt in range(100):  # bounded; the race, when it was there, lost about one write in a hundred
            call = stub.Converse(metadata=bearer(KEY_B), timeout=60)
            await call.write(pb.ConverseRequest(config=pb.SessionConfig()))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            assert (refused.value.code(), refused.value.details()) == (UNAUTH, WRONG), attempt
        call = stub.Converse(timeout=60)
        await call.done_writing()
        assert (await call.code(), await call.details()) == (UNAUTH, MISSING)
        silent = stub.Converse(timeout=60)  # refused after the wait for a first message
        assert await silent.code() == UNAUTH, await silent.details()


async def test_converse_works_with_the_key(keyed):
    address, *_ = keyed
    async with ConverseProbe(address, metadata=bearer(KEY_A)) as probe:
        await probe.send_text("hello there")
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        await probe.end()
        await probe.wait_for(lambda e: e.HasField("session_ended"))
    assert any("hello there" in text.text for text in probe.of("bot_text")), probe.kinds()


async def test_info_needs_the_key_health_and_reflection_do_not(keyed):
    from voicemesh.client import open_channel

    address, *_ = keyed
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Info(pb.OrchestratorServiceInfoRequest(), timeout=30)
        assert refused.value.code() == UNAUTH
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
        names = {s.name async for reply in listing for s in reply.list_services_response.service}
        assert "voicemesh.v1.OrchestratorService" in names
    # The SDK's channel puts the key on every call.
    channel = open_channel(address, api_key=KEY_A)
    try:
        info = await orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Info(pb.OrchestratorServiceInfoRequest(),
                                                                                 timeout=30)
        assert info.info.service == "orchestrator" and len(info.services) == 4
    finally:
        await channel.close()


async def test_rotated_key_file_applies_without_restart(keyed):
    address, keys, logs, *_ = keyed
    original = keys.read_text()

    async def status(key: str) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                await orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Info(
                    pb.OrchestratorServiceInfoRequest(), metadata=bearer(key), timeout=30)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    try:
        write_atomically(keys, f"{digest(KEY_A)}\n{digest(KEY_B)}\n")  # both, while clients move over
        assert (await status(KEY_A), await status(KEY_B)) == (grpc.StatusCode.OK, grpc.StatusCode.OK)
        write_atomically(keys, f"{digest(KEY_B)}\n")  # the old key retired
        assert (await status(KEY_A), await status(KEY_B)) == (UNAUTH, grpc.StatusCode.OK)
        # A broken update keeps the keys in force that it still lists, and adds none.
        write_atomically(keys, f"{digest(KEY_A)}\n{digest(KEY_B)}\nnot a digest\n")
        assert (await status(KEY_A), await status(KEY_B)) == (UNAUTH, grpc.StatusCode.OK)
        assert _log_count(logs / "orchestrator.log", "API keys file not reloaded") >= 1
        write_atomically(keys, f"{digest(KEY_A)}\n{digest(KEY_B)}\n")
        assert (await status(KEY_A), await status(KEY_B)) == (grpc.StatusCode.OK, grpc.StatusCode.OK)
        write_atomically(keys, f"{digest(KEY_B)}\nnot a digest\n")  # a removal and a typo in one edit: still removed
        assert (await status(KEY_A), await status(KEY_B)) == (UNAUTH, grpc.StatusCode.OK)
        write_atomically(keys, "# every key revoked\n")  # emptied on purpose: the door shuts
        assert (await status(KEY_A), await status(KEY_B)) == (UNAUTH, UNAUTH)
    finally:
        write_atomically(keys, original)
    assert await status(KEY_A) == grpc.StatusCode.OK


def _log_count(path: Path, fragment: str) -> int:
    return sum(1 for line in path.read_text(errors="replace").splitlines() if fragment in line)


# -- the transport ----------------------------------------------------------------------------------

async def _ws(url: str, headers: dict | None = None) -> tuple[aiohttp.ClientSession, WsClient, object]:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(url, headers=headers or {}, max_msg_size=0)
    client = WsClient(ws)
    return http, client, asyncio.create_task(client.read())


async def _start_and_close(url: str, headers: dict | None = None, first: str | None = None) -> WsClient:
    """Connect, send `first` (a start message) and wait for the session to start or the socket to close."""
    http, client, reader = await _ws(url, headers)
    try:
        if first is not None:
            try:
                await client.ws.send_str(first)
            except (ConnectionError, RuntimeError):
                pass  # already closed by the server: the close says why
        await client.wait_until(lambda: client.close_code is not None or client.events, "an event or the close")
        return client
    finally:
        await client.ws.close()
        reader.cancel()
        await http.close()


START = json.dumps({"type": "start"})


async def test_transport_refuses_a_websocket_without_its_token(keyed):
    *_, transport, _ = keyed
    for url, headers in ((transport.ws_url + "/ws", None), (transport.ws_url + "/ws?token=wrong", None),
                         (transport.ws_url + "/ws", {"Authorization": f"Bearer {KEY_B}"})):
        client = await _start_and_close(url, headers, START)
        assert client.close_code == 1008 and "unauthenticated" in client.close_reason, (url, client.close_reason)
        assert client.events == []
    async with aiohttp.ClientSession() as http:
        async with http.post(transport.http_url + "/api/offer", json={"type": "offer", "sdp": "m=audio"}) as reply:
            assert reply.status == 401 and "missing credential" in (await reply.json())["error"]
        async with http.get(transport.http_url + "/healthz") as reply:  # probes stay open
            assert reply.status == 200


async def test_transport_accepts_its_token_and_passes_its_own_key(keyed):
    *_, transport, keyless = keyed
    for url, headers in ((transport.ws_url + f"/ws?token={CALLER_KEY}", None),
                         (transport.ws_url + "/ws", {"Authorization": f"Bearer {CALLER_KEY}"})):
        client = await _start_and_close(url, headers, START)
        assert client.types()[:1] == ["session_started"], (client.types(), client.close_reason)
    # A transport without a key of its own is let in by nobody's token, but refused by the orchestrator.
    client = await _start_and_close(keyless.ws_url + "/ws", None, START)
    assert client.close_code is not None and "UNAUTHENTICATED" in client.close_reason, client.close_reason


def _twilio_start() -> str:
    return json.dumps({"event": "start", "streamSid": "MZ1", "start": {
        "streamSid": "MZ1", "callSid": "CA1", "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                                              "channels": 1}}})


async def test_twilio_signature_checked(keyed):
    *_, transport, _ = keyed
    url = transport.ws_url + "/twilio"
    forged = twilio_signature("not-the-token", url)
    for headers in (None, {"X-Twilio-Signature": forged}):
        client = await _start_and_close(url, headers, _twilio_start())
        assert client.close_code == 1008 and "unauthenticated" in client.close_reason, (headers, client.close_reason)
    # Signed with the account's token: the call starts (the transport logs it; Twilio gets no reply to a start).
    http, client, reader = await _ws(url, {"X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, url)})
    try:
        await client.ws.send_str(_twilio_start())
        deadline = time.monotonic() + 60
        while not any(entry.get("msg") == "call started" for entry in transport.log_entries()):
            assert client.close_code is None, (client.close_code, client.close_reason)
            assert time.monotonic() < deadline, [entry.get("msg") for entry in transport.log_entries()]
            await asyncio.sleep(0.05)  # polling the log file, bounded by the deadline
    finally:
        await client.ws.close()
        reader.cancel()
        await http.close()


# -- the signature schemes and the startup warning, in-process ------------------------------------

def test_twilio_signature_matches_the_published_vectors():
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"  # Twilio's request-validation example, token "12345"
    for caller, expected in (("+14158675309", "RSOYDt4T1cUTdK1PDd93/VVr8B8="), ("+14158675310", "GvWf1cFY/Q7PnoempGyD5oXAezc=")):
        params = {"CallSid": "CA1234567890ABCDE", "Caller": caller, "Digits": "1234", "From": caller, "To": "+18005551212"}
        assert twilio_signature("12345", url, params) == expected
        assert verify_twilio("12345", url, expected, params)
        assert not verify_twilio("12345", url, expected, {**params, "Digits": "9999"})
        assert not verify_twilio("54321", url, expected, params)
    signed = twilio_signature(TWILIO_TOKEN, "wss://voice.example.com/twilio")
    assert verify_twilio(TWILIO_TOKEN, "wss://voice.example.com:443/twilio", signed)  # the default port is optional


def test_telnyx_signature():
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate()
    public = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    body, stamp = b'{"data":{"event_type":"call.answered"}}', "1764590000"
    signature = base64.b64encode(key.sign(f"{stamp}|".encode() + body)).decode()
    assert verify_telnyx(public, signature, stamp, body, now=1764590010)
    assert not verify_telnyx(public, signature, stamp, body + b" ", now=1764590010)  # the body changed
    assert not verify_telnyx(public, signature, stamp, body, now=1764590000 + 3600)  # a replay, an hour later
    assert not verify_telnyx(public, "not base64!", stamp, body, now=1764590010)


def test_open_orchestrator_warns_off_loopback(caplog):
    from voicemesh.runtime.auth import server_interceptors

    with caplog.at_level("WARNING", logger="voicemesh.auth"):
        assert server_interceptors("orchestrator", "", "127.0.0.1") == []
        assert not caplog.records
        assert server_interceptors("orchestrator", "", "0.0.0.0") == []
        assert server_interceptors("stt", "", "0.0.0.0") == []  # backends take no keys: nothing to warn about
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["no API keys configured (VOICEMESH_API_KEYS_FILE)"]
