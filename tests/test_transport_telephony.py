"""Twilio and Telnyx media streams through the real transport, orchestrator and fake services.

The fake STT hears "tell me a long story" for each call's first utterance, so the bot talks
long enough to be interrupted.
"""
from __future__ import annotations

import asyncio
import base64
import json
import signal
import time

import numpy as np
import pytest
from aiohttp import web

from support import BACKENDS, START_S, FakeScript, Processes, backend_env, fake_mesh, free_port, silence, tone, wait_serving
from transport_harness import WAIT_S, is_type, send_paced, split, start_transport, ws_session
from voicemesh.runtime.audio import mulaw_to_pcm16, pcm16_to_mulaw


def _serve_orchestrator(procs: Processes, backends: dict[str, str], name: str = "orchestrator", grace: str = "10") -> str:
    port = free_port()
    proc = procs.serve("orchestrator", port, backends, ["--grace-seconds", grace], name=name)
    wait_serving(f"127.0.0.1:{port}", proc, timeout=START_S)
    return f"127.0.0.1:{port}"


async def _logged(transport, predicate, timeout: float = WAIT_S) -> dict:
    """Until the transport has logged an entry that satisfies `predicate`; returns it."""
    deadline = time.monotonic() + timeout
    while not (found := [e for e in transport.log_entries() if predicate(e)]):
        assert time.monotonic() < deadline, (f"not logged within {timeout:.0f} s; "
                                             f"log: {[e.get('msg') for e in transport.log_entries()]}")
        await asyncio.sleep(0.05)
    return found[0]


@pytest.fixture(scope="module")
def phone_mesh(tmp_path_factory):
    """Fake services (long replies) + orchestrator + transport; yields (procs, the backends' env, transport)."""
    procs = Processes(tmp_path_factory.mktemp("transport-phone"))
    try:
        backends = backend_env(fake_mesh(procs, FakeScript(transcripts=("tell me a long story",)), services=BACKENDS))
        orchestrator = _serve_orchestrator(procs, backends)
        yield procs, backends, start_transport(procs, orchestrator)
    finally:
        procs.stop_all()


def twilio_start(stream: str = "MZ1", call: str = "CA1", encoding: str = "audio/x-mulaw") -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": stream, "start": {
        "accountSid": "AC123", "streamSid": stream, "callSid": call, "tracks": ["inbound"],
        "mediaFormat": {"encoding": encoding, "sampleRate": 8000, "channels": 1}, "customParameters": {"caller": "test"}}})


def twilio_media(frame: bytes, stream: str = "MZ1") -> str:
    return json.dumps({"event": "media", "streamSid": stream,
                       "media": {"track": "inbound", "chunk": "1", "timestamp": "0",
                                 "payload": base64.b64encode(frame).decode()}})


def speech_mulaw(seconds_tone: float = 0.6) -> list[bytes]:
    pcm = np.concatenate((silence(0.3, 8000), tone(seconds_tone, 8000), silence(1.0, 8000)))
    return split(pcm16_to_mulaw(pcm), 160)  # 20 ms frames, as Twilio sends them


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


async def test_twilio_call_audio_clear_mark_dtmf(phone_mesh):
    _, _, transport = phone_mesh
    async with ws_session(transport.ws_url + "/twilio") as call:
        send = call.ws.send_str
        await send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await send(twilio_start())
        await send(json.dumps({"event": "dtmf", "streamSid": "MZ1", "sequenceNumber": "2",
                               "dtmf": {"track": "inbound_track", "digit": "7"}}))
        await send_paced(send, [twilio_media(f) for f in speech_mulaw()])
        # The long reply streams back as μ-law media for this stream.
        media = await call.wait_count(is_type("media"), 25)
        assert all(m["streamSid"] == "MZ1" for m in media)
        pcm = mulaw_to_pcm16(b"".join(base64.b64decode(m["media"]["payload"]) for m in media))
        assert abs(dominant_hz(pcm, 8000) - 440) < 10  # the fake TTS tone, decoded as 8 kHz μ-law
        # Barge-in: the caller talks over the bot; Twilio is told to drop what it buffered.
        await send_paced(send, [twilio_media(f) for f in speech_mulaw(0.5)])
        clear = await call.wait_for(is_type("clear"))
        assert clear == {"event": "clear", "streamSid": "MZ1"}
        mark = await call.wait_for(is_type("mark"))
        assert mark["streamSid"] == "MZ1" and mark["mark"]["name"].startswith("turn-1-")
        await send(json.dumps({"event": "mark", "streamSid": "MZ1", "mark": {"name": mark["mark"]["name"]}}))
        await send(json.dumps({"event": "stop", "streamSid": "MZ1", "stop": {"accountSid": "AC123", "callSid": "CA1"}}))
        assert await call.wait_closed() == (1000, "call ended by the carrier")
    logs = transport.log_entries()
    dtmf = [e for e in logs if e["msg"] == "dtmf received" and e["connection"].startswith("twilio")]
    assert [e["digit"] for e in dtmf] == ["7"] and dtmf[0]["session_id"]
    assert any(e["msg"] == "mark played" and e["mark"] == mark["mark"]["name"] for e in logs)


async def test_telnyx_pcmu_call_audio_clear_dtmf(phone_mesh):
    _, _, transport = phone_mesh
    async with ws_session(transport.ws_url + "/telnyx") as call:
        send = call.ws.send_str
        await send(json.dumps({"event": "connected", "version": "1.0.0"}))
        await send(json.dumps({"event": "start", "sequence_number": "1", "stream_id": "S1", "start": {
            "call_control_id": "v3:abc", "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}}))
        await send(json.dumps({"event": "dtmf", "stream_id": "S1", "dtmf": {"digit": "#"}}))
        frames = [json.dumps({"event": "media", "stream_id": "S1", "media": {"track": "inbound", "payload":
                              base64.b64encode(f).decode()}}) for f in speech_mulaw()]
        await send_paced(send, frames)
        await call.wait_count(is_type("media"), 25)
        pcm = mulaw_to_pcm16(b"".join(base64.b64decode(m["media"]["payload"]) for m in call.of("media")))
        assert len(pcm) >= 8000 and abs(dominant_hz(pcm, 8000) - 440) < 10
        await send_paced(send, frames)
        assert await call.wait_for(is_type("clear")) == {"event": "clear"}
    dtmf = [e for e in transport.log_entries() if e["msg"] == "dtmf received" and e["connection"].startswith("telnyx")]
    assert [e["digit"] for e in dtmf] == ["#"]


async def test_telnyx_l16_is_big_endian_both_ways(phone_mesh):
    _, _, transport = phone_mesh
    async with ws_session(transport.ws_url + "/telnyx") as call:
        send = call.ws.send_str
        await send(json.dumps({"event": "start", "stream_id": "S2", "start": {
            "call_control_id": "v3:l16", "media_format": {"encoding": "L16", "sample_rate": 16000, "channels": 1}}}))
        pcm = np.concatenate((silence(0.3), tone(0.6), silence(1.0))).astype(">i2").tobytes()
        await send_paced(send, [json.dumps({"event": "media", "media": {"payload": base64.b64encode(f).decode()}})
                                for f in split(pcm, 640)])
        await call.wait_count(is_type("media"), 25)
        out = np.frombuffer(b"".join(base64.b64decode(m["media"]["payload"]) for m in call.of("media")), ">i2")
        assert len(out) >= 16000 and abs(dominant_hz(out, 16000) - 440) < 10


TELEPHONY_BAD_INPUT = [
    ("/twilio", ["{nope"], 1007, "malformed JSON"),
    ("/twilio", [twilio_media(b"\xff" * 160)], 1008, "media before start"),
    ("/twilio", [twilio_start(encoding="audio/x-alaw")], 1003, "unsupported codec"),
    ("/twilio", [twilio_start(), json.dumps({"event": "media", "media": {"payload": "@@@"}})], 1007, "not valid base64"),
    ("/twilio", [twilio_start(), b"\x00\x01"], 1003, "not binary"),
    ("/twilio", [twilio_start(), json.dumps({"event": "dtmf", "dtmf": {"digit": "55"}})], 1007, "dtmf.digit"),
    ("/twilio", [json.dumps({"event": "party"})], 1008, "unknown event"),
    ("/telnyx", [json.dumps({"event": "start", "start": {"media_format": {"encoding": "PCMA", "sample_rate": 8000}}})],
     1003, "unsupported codec"),
    ("/telnyx", [json.dumps({"event": "start", "start": {"media_format": {"encoding": "L16", "sample_rate": 16000}}}),
                 json.dumps({"event": "media", "media": {"payload": base64.b64encode(b"\x01\x02\x03").decode()}})],
     1007, "not whole samples"),
]


@pytest.mark.parametrize("path, messages, code, reason", TELEPHONY_BAD_INPUT,
                         ids=[f"{p[1:]}-{r}" for p, _, _, r in TELEPHONY_BAD_INPUT])
async def test_telephony_bad_input_closes_only_that_call(phone_mesh, path, messages, code, reason):
    _, _, transport = phone_mesh
    async with ws_session(transport.ws_url + "/twilio") as healthy:
        await healthy.ws.send_str(twilio_start(stream="MZok", call="CAok"))
        async with ws_session(transport.ws_url + path) as bad:
            for message in messages:
                await (bad.ws.send_bytes(message) if isinstance(message, bytes) else bad.ws.send_str(message))
            got = await bad.wait_closed()
            assert got[0] == code and reason in got[1], got
        # The healthy call still talks: its speech gets μ-law audio back.
        await send_paced(healthy.ws.send_str, [twilio_media(f, "MZok") for f in speech_mulaw()])
        await healthy.wait_for(is_type("media"))
        assert healthy.close_code is None


async def test_twilio_hang_up_when_the_session_ends(phone_mesh):
    """The orchestrator ends the session (here: it shuts down); the transport waits for the
    last mark, then hangs the call up through the REST API with the configured credentials."""
    procs, backends, _ = phone_mesh
    requests: list[tuple[str, dict, str]] = []

    async def calls(request: web.Request) -> web.Response:
        requests.append((request.path, dict(await request.post()), request.headers.get("Authorization", "")))
        return web.json_response({"status": "completed"})

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{account}/Calls/{call}.json", calls)
    runner = web.AppRunner(app)
    await runner.setup()
    api_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", api_port).start()
    try:
        orchestrator = _serve_orchestrator(procs, backends, name="orchestrator-hangup", grace="1")
        transport = start_transport(procs, orchestrator, name="transport-hangup", env={
            "TWILIO_ACCOUNT_SID": "AC123", "TWILIO_AUTH_TOKEN": "secret",
            "VOICEMESH_TRANSPORT_TWILIO_API_BASE": f"http://127.0.0.1:{api_port}"})
        async with ws_session(transport.ws_url + "/twilio") as call:
            await call.ws.send_str(twilio_start(call="CA9"))
            await _logged(transport, lambda e: e.get("msg") == "call started" and e.get("call") == "CA9")
            orchestrator_proc = next(p for p in procs.procs if "orchestrator" in " ".join(p.args) and
                                     orchestrator.split(":")[1] in p.args)
            orchestrator_proc.send_signal(signal.SIGTERM)
            code, reason = await call.wait_closed()
        assert requests == [("/2010-04-01/Accounts/AC123/Calls/CA9.json", {"Status": "completed"},
                             "Basic " + base64.b64encode(b"AC123:secret").decode())]
        assert code in (1000, 1011, 1013), (code, reason)
        assert any(e["msg"] == "call hung up" for e in transport.log_entries())
    finally:
        await runner.cleanup()
