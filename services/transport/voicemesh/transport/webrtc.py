"""WebRTC (aiortc): `POST /api/offer` with an SDP offer, answered with the SDP answer.

Opus both ways. Caller audio is decoded and resampled to 16 kHz mono for the session; bot
audio comes from the session as 48 kHz mono and is paced out in 20 ms frames. A data channel
(any label; the page opens "events") carries the same JSON events and client messages as the
WebSocket. ICE gathers host candidates only on the configured interfaces, with no STUN.
"""
from __future__ import annotations

import asyncio
import fractions
import ipaddress
import logging
import time

import aioice.ice
import av
import ifaddr
import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from voicemesh.transport import events
from voicemesh.transport.bridge import ConverseBridge, pcm16
from voicemesh.transport.events import CLOSE_GOING_AWAY, ProtocolError
from voicemesh.transport.server import Connection, TransportServer, transport_of
from voicemesh.transport.settings import TransportSettings
from voicemesh.transport.websocket import session_config
from voicemesh.v1 import orchestrator_pb2 as pb

log = logging.getLogger("voicemesh.transport.webrtc")
INPUT_RATE_HZ = 16000  # what the orchestrator's VAD and STT run at: no second resample there
OUTPUT_RATE_HZ = 48000  # Opus' own rate
FRAME_SAMPLES = OUTPUT_RATE_HZ // 50  # 20 ms
MAX_BUFFER_SECONDS = 10  # bot audio is sent at real-time pace; this only bounds a stall
MAX_QUEUED_EVENTS = 1000  # events waiting for the data channel to open


def ice_addresses(settings: TransportSettings) -> list[str] | None:
    """The host addresses ICE may use; None means aioice's default (every non-loopback address)."""
    wanted = [item.strip() for item in settings.ice_interfaces.split(",") if item.strip()]
    if not wanted:
        host = settings.http_host
        if host in ("", "0.0.0.0", "::"):
            return None
        return ["127.0.0.1" if host == "localhost" else host]
    addresses: list[str] = []
    adapters = {adapter.nice_name: adapter for adapter in ifaddr.get_adapters()}
    for item in wanted:
        try:
            addresses.append(str(ipaddress.ip_address(item)))
            continue
        except ValueError:
            pass
        if item not in adapters:
            raise SystemExit(f"transport: ice_interfaces names {item!r}, which is neither an IP address nor an interface "
                             f"(interfaces here: {', '.join(sorted(adapters))})")
        for ip in adapters[item].ips:
            addresses.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return addresses


def configure_ice(settings: TransportSettings) -> None:
    """Limit aioice's host candidates (process-wide: one transport process, one setting)."""
    addresses = ice_addresses(settings)
    if addresses is None:
        return
    log.info("ice interfaces", extra={"addresses": addresses})

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in addresses if (use_ipv4 and ":" not in a) or (use_ipv6 and ":" in a)]

    aioice.ice.get_host_addresses = host_addresses


class BotAudioTrack(MediaStreamTrack):
    """Bot audio out: 20 ms frames at real-time pace, silence when nothing is queued."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        self._buffer = bytearray()
        self._pts = 0
        self._start: float | None = None

    def push(self, data: bytes) -> None:
        self._buffer += data
        excess = len(self._buffer) - OUTPUT_RATE_HZ * 2 * MAX_BUFFER_SECONDS
        if excess > 0:
            del self._buffer[:excess]

    def clear(self) -> None:
        self._buffer.clear()

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        delay = self._start + self._pts / OUTPUT_RATE_HZ - now
        if delay > 0:
            await asyncio.sleep(delay)
        size = FRAME_SAMPLES * 2
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        samples = np.frombuffer(chunk.ljust(size, b"\0"), dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = OUTPUT_RATE_HZ, self._pts, fractions.Fraction(1, OUTPUT_RATE_HZ)
        self._pts += FRAME_SAMPLES
        return frame


class PeerSession:
    """One browser over WebRTC: a peer connection, its data channel and its Converse bridge."""

    def __init__(self, server: TransportServer, connection: Connection, pc: RTCPeerConnection):
        self.server, self.connection, self.pc = server, connection, pc
        self.bot_track = BotAudioTrack()
        self.bridge: ConverseBridge | None = None
        self.channel = None
        self._queued: list[str] = []
        self._tasks: set[asyncio.Task] = set()
        self._closed = asyncio.Event()
        connection.closer = self.close
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- inbound ---------------------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._pump_audio(track))

    async def _pump_audio(self, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=INPUT_RATE_HZ)
        while not self._closed.is_set():
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.connection.touch()
            for out in resampler.resample(frame):
                if self.bridge is not None:
                    await self.bridge.send_audio(out.to_ndarray().tobytes())

    def _on_datachannel(self, channel) -> None:
        self.channel = channel
        channel.on("message", lambda message: self._spawn(self._on_message(message)))
        for text in self._queued:
            channel.send(text)
        self._queued.clear()

    async def _on_message(self, message) -> None:
        self.connection.touch()
        try:
            if not isinstance(message, str):
                raise ProtocolError(events.CLOSE_UNSUPPORTED, "data channel messages are JSON text")
            parsed = events.client_message(message)
        except ProtocolError as err:
            self._send({"type": "error", "code": "INVALID_ARGUMENT", "message": err.reason, "fatal": True,
                        "source": "transport"})
            await self.close(err.close_code, err.reason)
            return
        kind = parsed["type"]
        if kind == "text":
            await self.bridge.send_text(parsed["text"])
        elif kind == "dtmf":
            await self.bridge.send_dtmf(parsed["digit"])
        elif kind == "end":
            await self.bridge.end()
        elif kind == "cancel":
            await self.bridge.cancel()
        elif kind == "ping":
            self._send({"type": "pong"})

    async def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close(events.CLOSE_NORMAL, f"peer connection {self.pc.connectionState}")

    # -- BridgeSink ----------------------------------------------------------------------------

    async def audio(self, data: bytes) -> None:
        self.bot_track.push(data)

    async def clear(self, turn_number: int) -> None:
        self.bot_track.clear()
        self._send({"type": "clear", "turn": turn_number})

    async def event(self, response: pb.ConverseResponse) -> None:
        if (event := events.event_json(response)) is not None:
            self._send(event)

    def _send(self, event: dict) -> None:
        text = events.dumps(event)
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(text)
        elif len(self._queued) < MAX_QUEUED_EVENTS:
            self._queued.append(text)

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Until the session ends or the peer goes; then close everything."""
        await self.bridge.wait()
        if not self._closed.is_set():
            outcome = self.bridge.outcome
            if not outcome.ok and outcome.reason != "ERROR":  # an in-band Error was already forwarded
                self._send({"type": "error", "code": outcome.code.name, "message": outcome.details, "fatal": True,
                            "source": "orchestrator"})
            await asyncio.sleep(0.5)  # let the data channel deliver session_ended
            await self.close(events.CLOSE_NORMAL, outcome.describe())

    async def close(self, code: int, reason: str) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if code == CLOSE_GOING_AWAY:
            self._send({"type": "error", "code": "UNAVAILABLE", "message": reason, "fatal": True, "source": "transport"})
        log.info("closing", extra={"connection": self.connection.label, "reason": reason})
        self.bot_track.stop()
        if self.bridge is not None:
            await self.bridge.close()
        await self.pc.close()
        for task in list(self._tasks):
            task.cancel()
        self.connection.release()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def offer(request: web.Request) -> web.Response:
    """{"sdp", "type": "offer", "config": {start-message fields}} -> {"sdp", "type": "answer", "session_id"}."""
    server = transport_of(request)
    try:
        body = events.parse_json(await request.text(), "offer")
    except ProtocolError as err:
        return _error(400, err.reason)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"offer larger than {server.settings.max_message_bytes} bytes")
    if body.get("type") != "offer" or not isinstance(body.get("sdp"), str) or "m=audio" not in body["sdp"]:
        return _error(400, "expected {\"type\": \"offer\", \"sdp\": \"...\"} with an audio m-line")
    try:
        config = session_config(body.get("config") or {}, server.settings, client="webrtc")
    except ProtocolError as err:
        return _error(400, err.reason)
    config.input_format.CopyFrom(pcm16(INPUT_RATE_HZ))
    config.output_format.CopyFrom(pcm16(OUTPUT_RATE_HZ))
    connection, code, reason = server.admit("webrtc", request.remote or "?")
    if connection is None:
        return _error(503, reason)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: host candidates only
    session = PeerSession(server, connection, pc)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
        pc.addTrack(session.bot_track)
        await pc.setLocalDescription(await pc.createAnswer())
        session.bridge = ConverseBridge(server.channel, config, session, connection.label)
        await session.bridge.open()
    except (ValueError, ConnectionError) as err:
        await session.close(events.CLOSE_INTERNAL, str(err))
        status = 503 if isinstance(err, ConnectionError) else 400
        return _error(status, f"{'orchestrator' if status == 503 else 'bad offer'}: {err}")
    session._spawn(session.run())
    return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                              "session_id": session.bridge.session_id})
