"""WebRTC signalling and media without a browser: aiortc as the client, the real transport in
front of the real orchestrator and the scripted fakes. (The browser test covers chromium.)"""
from __future__ import annotations

import asyncio
import fractions
import json
import time

import aiohttp
import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from support import Processes, silence, tone
from transport_harness import start_transport


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch):
    """The client side (this process) gathers on loopback too; aioice skips 127.0.0.1 by default."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else [])


@pytest.fixture(scope="module")
def transport(fake_mesh, tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("transport-webrtc"))
    try:
        yield start_transport(procs, fake_mesh, {"VOICEMESH_TRANSPORT_MAX_MESSAGE_BYTES": "65536"})
    finally:
        procs.stop_all()


class ScriptedMic(MediaStreamTrack):
    """20 ms frames of the given 48 kHz samples at real-time pace, then silence."""

    kind = "audio"

    def __init__(self, samples: np.ndarray):
        super().__init__()
        self.samples, self.pts, self.start = samples, 0, None

    async def recv(self):
        self.start = self.start or time.monotonic()
        await asyncio.sleep(max(0.0, self.start + self.pts / 48000 - time.monotonic()))
        chunk = self.samples[self.pts : self.pts + 960]
        chunk = np.pad(chunk, (0, 960 - len(chunk))).astype("<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48000, self.pts, fractions.Fraction(1, 48000)
        self.pts += 960
        return frame


async def _connect(transport, mic: MediaStreamTrack):
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(mic)
    channel = pc.createDataChannel("events")
    events: list[dict] = []
    bot_audio: list[np.ndarray] = []
    channel.on("message", lambda m: events.append(json.loads(m)))

    @pc.on("track")
    def on_track(track):
        async def pull():
            while True:
                try:
                    frame = await track.recv()
                except Exception:  # noqa: BLE001 - the track ended
                    return
                bot_audio.append(frame.to_ndarray().reshape(-1))
        asyncio.ensure_future(pull())

    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(transport.http_url + "/api/offer", json={
                "type": "offer", "sdp": pc.localDescription.sdp, "config": {"interim_transcripts": True}}) as reply:
            assert reply.status == 200, await reply.text()
            answer = await reply.json()
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    return pc, channel, events, bot_audio


WAIT_S = 60.0  # deadline of a wait: it returns as soon as the state is reached; never a speed claim


async def _wait(predicate, seen, timeout: float = WAIT_S):
    """Until `predicate()` holds; past the deadline, fail with `seen()` (what did arrive)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached within {timeout:.0f} s; {seen()}"
        await asyncio.sleep(0.05)


async def test_webrtc_spoken_turn_events_and_opus_audio(transport):
    speech = np.concatenate((silence(0.5, 48000), tone(0.6, 48000), silence(8.0, 48000)))
    pc, channel, events, bot_audio = await _connect(transport, ScriptedMic(speech))

    def seen():
        return f"events {[e['type'] for e in events]}, {len(bot_audio)} bot frames, connection {pc.connectionState}"

    try:
        await _wait(lambda: any(e["type"] == "turn_ended" for e in events), seen)
        types = [e["type"] for e in events]
        assert types[0] == "session_started" and "user_transcript" in types and "bot_text" in types
        finals = [e for e in events if e["type"] == "user_transcript" and e["final"]]
        bot = next(e for e in events if e["type"] == "bot_text")
        assert bot["text"] == f"You said: {finals[0]['text']}."
        # The 440 Hz reply came back through Opus: find it in the decoded 48 kHz stereo.
        await _wait(lambda: sum(np.abs(a).max() > 3000 for a in bot_audio) > 10, seen)
        channel.send(json.dumps({"type": "end"}))
        await _wait(lambda: any(e["type"] == "session_ended" for e in events), seen)
        assert events[-1] == {"type": "session_ended", "reason": "ended"}
    finally:
        await pc.close()


async def test_webrtc_malformed_data_channel_message_ends_that_session(transport):
    pc, channel, events, _ = await _connect(transport, ScriptedMic(silence(30, 48000)))

    def seen():
        return f"events {[e['type'] for e in events]}, channel {channel.readyState}, connection {pc.connectionState}"

    try:
        await _wait(lambda: channel.readyState == "open" and events, seen)
        channel.send("{broken")
        await _wait(lambda: any(e["type"] == "error" for e in events), seen)
        error = next(e for e in events if e["type"] == "error")
        assert error["fatal"] and "malformed JSON" in error["message"]
        await _wait(lambda: pc.connectionState == "closed" or channel.readyState == "closed", seen)
    finally:
        await pc.close()


@pytest.mark.parametrize("body, status, words", [
    ("{nope", 400, "malformed JSON"),
    (json.dumps({"type": "answer", "sdp": "v=0"}), 400, "expected"),
    (json.dumps({"type": "offer", "sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"}), 400, "bad offer"),
    (json.dumps({"type": "offer", "sdp": "m=audio " + "x" * 70000}), 413, "larger than"),
    (json.dumps({"type": "offer", "sdp": "m=audio", "config": {"voice": 5}}), 400, "start.voice"),
])
async def test_offer_bad_input(transport, body, status, words):
    async with aiohttp.ClientSession() as http:
        async with http.post(transport.http_url + "/api/offer", data=body,
                             headers={"Content-Type": "application/json"}) as reply:
            assert reply.status == status
            assert words in (await reply.json())["error"]
