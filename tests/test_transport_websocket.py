"""The transport's WebSocket protocol (/ws) and its limits, as separate processes: the real
transport in front of the real orchestrator in front of the scripted fakes.

Asserts what arrives and how connections close, never speed.
"""
from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import numpy as np
import pytest

from support import Processes, silence, tone
from transport_harness import is_type, send_paced, split, start_transport, ws_session
from voicemesh.v1 import transport_pb2, transport_pb2_grpc

START = json.dumps({"type": "start"})


@pytest.fixture(scope="module")
def transport(fake_mesh, tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("transport-ws"))
    try:
        env = {"VOICEMESH_TRANSPORT_MAX_CONNECTIONS": "4", "VOICEMESH_TRANSPORT_MAX_MESSAGE_BYTES": "65536",
               "VOICEMESH_TRANSPORT_IDLE_TIMEOUT_SECONDS": "3"}
        yield start_transport(procs, fake_mesh, env)
    finally:
        procs.stop_all()


async def _healthy_turn(client, text: str) -> None:
    """A text turn on an open session must still get its reply."""
    await client.ws.send_str(json.dumps({"type": "text", "text": text}))
    await client.wait_for(is_type("bot_text", text=f"You said: {text}."))


async def test_text_turn_events_audio_and_clean_close(transport):
    async with ws_session(transport.ws_url + "/ws") as client:
        await client.ws.send_str(START)
        started = await client.wait_for(is_type("session_started"))
        assert started["output"] == {"encoding": "pcm16", "sample_rate": 24000, "channels": 1}
        await client.ws.send_str(json.dumps({"type": "text", "text": "hello there"}))
        ended = await client.wait_for(is_type("turn_ended"))
        await client.ws.send_str(json.dumps({"type": "end"}))
        assert await client.wait_closed() == (1000, "session ended: ended")
        assert client.types() == ["session_started", "turn_started", "user_transcript", "speaking", "bot_text",
                                  "speaking", "turn_ended", "metrics", "session_ended"]
        assert [e["text"] for e in client.of("bot_text")] == ["You said: hello there."]
        assert ended["interrupted"] is False and ended["turn"] == 1
        metrics = client.of("metrics")[0]  # asked for by default: the page draws its TTFB waterfall
        assert metrics["turn_number"] == 1 and set(metrics["ttfb_ms"]) >= {"llm", "tts"}
        # The fake TTS makes 20 ms of 440 Hz tone per character, here as 24 kHz PCM16.
        pcm = np.frombuffer(b"".join(client.audio), dtype="<i2")
        assert len(pcm) / 24000 == pytest.approx(len("You said: hello there.") * 0.020, abs=0.05)
        assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 1000


async def test_spoken_turn_at_48k_stereo(transport):
    """Binary PCM16 in the client's own format (48 kHz stereo) is resampled and mixed down."""
    async with ws_session(transport.ws_url + "/ws") as client:
        await client.ws.send_str(json.dumps({"type": "start", "input": {"sample_rate": 48000, "channels": 2},
                                             "output": {"sample_rate": 16000}}))
        await client.wait_for(is_type("session_started"))
        mono = np.concatenate((silence(0.3, 48000), tone(0.6, 48000), silence(1.0, 48000)))
        stereo = np.repeat(mono, 2).astype("<i2").tobytes()
        await send_paced(client.ws.send_bytes, split(stereo, 48 * 2 * 2 * 20))
        await client.wait_for(is_type("turn_ended"))
        speaking = [(e["who"], e["state"]) for e in client.of("speaking")]
        assert speaking == [("user", "started"), ("user", "stopped"), ("bot", "started"), ("bot", "stopped")]
        final = [e for e in client.of("user_transcript") if e["final"]]
        assert final and client.of("bot_text")[0]["text"] == f"You said: {final[0]['text']}."
        assert client.of("turn_ended")[0]["latency_ms"] > 0
        assert sum(map(len, client.audio)) > 16000 * 2 * 0.2  # 16 kHz output as asked


async def test_barge_in_sends_clear_and_drops_the_rest(transport):
    async with ws_session(transport.ws_url + "/ws") as client:
        await client.ws.send_str(START)
        await client.ws.send_str(json.dumps({"type": "text", "text": "tell me a long story"}))
        await client.wait_for(is_type("speaking", who="bot", state="started"))
        await client.wait_until(lambda: client.audio, "bot audio")  # the bot is being heard
        speech = np.concatenate((tone(0.5), silence(1.0))).astype("<i2").tobytes()
        await send_paced(client.ws.send_bytes, split(speech, 640))
        await client.wait_for(is_type("turn_ended", turn=2))
        types = client.types()
        clear = types.index("clear")
        assert client.events[clear]["turn"] == 1
        # "clear" comes as soon as the user starts over the bot, before the interrupted turn ends.
        first_end = types.index("turn_ended")
        assert clear < first_end and client.events[first_end]["interrupted"] is True
        assert types.count("clear") == 1
        # What was not sent by then is dropped: no audio from the clear until turn 2's reply ...
        second_reply = next(i for i, e in enumerate(client.events) if is_type("speaking", who="bot", state="started")(e)
                            and e["turn"] == 2)
        assert not [at for at in client.audio_at if clear < at <= second_reply]
        # ... and of the 30 queued sentences (20 ms of 24 kHz PCM16 per character) only a part was sent.
        reply = " ".join(f"This is sentence number {n} of a long story." for n in range(1, 31))
        turn1 = sum(len(data) for data, at in zip(client.audio, client.audio_at, strict=True) if at <= clear)
        assert 0 < turn1 / 48000 < len(reply) * 0.020


async def test_info_reports_endpoints_and_limits(transport):
    async with grpc.aio.insecure_channel(transport.grpc_address) as channel:
        info = await transport_pb2_grpc.TransportServiceStub(channel).Info(transport_pb2.TransportServiceInfoRequest())
    assert info.info.service == "transport"
    assert info.http_url == transport.http_url
    assert list(info.protocols) == ["webrtc", "websocket", "twilio", "telnyx"]
    assert info.max_connections == 4 and info.max_message_bytes == 65536
    assert info.total_connections >= 1


async def test_page_and_health_are_served(transport):
    async with aiohttp.ClientSession() as http:
        async with http.get(transport.http_url + "/") as reply:
            page = await reply.text()
            assert reply.status == 200 and 'id="connect"' in page and "app.js" in page
        async with http.get(transport.http_url + "/healthz") as reply:
            assert reply.status == 200 and (await reply.json())["status"] == "serving"


BAD_INPUT = [
    # (what the client sends after connecting, expected close code, words in the reason)
    ([b"\x00\x01"], 1008, "start message before audio"),
    (["{not json"], 1007, "malformed JSON"),
    (['["start"]'], 1007, "must be a JSON object"),
    ([json.dumps({"type": "hello"})], 1008, "first message must be"),
    ([json.dumps({"type": "start", "input": {"encoding": "opus"}})], 1003, "unsupported codec"),
    ([json.dumps({"type": "start", "input": {"sample_rate": 96000}})], 1007, "sample_rate"),
    ([START, b"\x00\x01\x02"], 1007, "not whole pcm16 frames"),
    ([START, json.dumps({"type": "dance"})], 1008, "unknown message type"),
    ([START, json.dumps({"type": "dtmf", "digit": "x"})], 1007, "dtmf digit"),
    ([START, "{oops"], 1007, "malformed JSON"),
    ([START, b"\x00" * 70000], 1009, "larger than 65536 bytes"),
]


@pytest.mark.parametrize("messages, code, reason", BAD_INPUT, ids=[r for _, _, r in BAD_INPUT])
async def test_bad_input_closes_only_that_connection(transport, messages, code, reason):
    async with ws_session(transport.ws_url + "/ws") as healthy:
        await healthy.ws.send_str(START)
        await healthy.wait_for(is_type("session_started"))
        async with ws_session(transport.ws_url + "/ws") as bad:
            for message in messages:
                if isinstance(message, bytes):
                    await bad.ws.send_bytes(message)
                else:
                    await bad.ws.send_str(message)
            got_code, got_reason = await bad.wait_closed()
            assert got_code == code and reason in got_reason, (got_code, got_reason)
        await _healthy_turn(healthy, "still here")


async def test_idle_connection_is_closed(transport):
    async with ws_session(transport.ws_url + "/ws") as client:
        await client.ws.send_str(START)
        await client.wait_for(is_type("session_started"))
        code, reason = await client.wait_closed()  # idle_timeout_seconds is 3 here
        assert code == 1008 and "idle for 3 s" in reason


async def test_connections_over_the_limit_are_refused(transport):
    async with ws_session(transport.ws_url + "/ws") as first:
        await first.ws.send_str(START)
        await first.wait_for(is_type("session_started"))
        sessions = [ws_session(transport.ws_url + "/ws") for _ in range(3)]
        clients = [await s.__aenter__() for s in sessions]  # 4 open: the limit
        try:
            async with ws_session(transport.ws_url + "/ws") as refused:
                code, reason = await refused.wait_closed()
                assert code == 1013 and "too many connections (max 4)" in reason
            assert all(c.close_code is None for c in clients)  # the admitted ones stay open
        finally:
            for s in sessions:
                await s.__aexit__(None, None, None)
        await _healthy_turn(first, "after the refusal")


async def test_sigterm_drains_then_closes_open_connections(fake_mesh, tmp_path):
    """On SIGTERM the transport stops taking connections, gives open ones the grace period,
    then closes them with 1001, and exits 0."""
    procs = Processes(tmp_path)
    try:
        draining = start_transport(procs, fake_mesh, name="transport-drain", extra=["--grace-seconds", "1"])
        async with ws_session(draining.ws_url + "/ws") as client:
            await client.ws.send_str(START)
            await client.wait_for(is_type("session_started"))
            draining.proc.terminate()
            code, reason = await client.wait_closed()
        assert code == 1001 and "shutting down" in reason
        assert await asyncio.to_thread(draining.proc.wait, 60) == 0
    finally:
        procs.stop_all()
