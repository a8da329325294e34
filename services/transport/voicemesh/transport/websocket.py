"""WebSocket for browsers and simple clients, at /ws.

A JSON `start` message first; then binary PCM16 little-endian frames both ways and JSON
events (server to client) and messages (client to server). The README has the protocol.
"""
from __future__ import annotations

from aiohttp import web

from voicemesh.transport import events
from voicemesh.transport.bridge import pcm16
from voicemesh.transport.events import (
    CLOSE_BAD_DATA, CLOSE_POLICY, CLOSE_UNSUPPORTED, ProtocolError, event_json,
)
from voicemesh.transport.wsbase import WsSession, serve
from voicemesh.v1 import orchestrator_pb2 as pb

DEFAULT_INPUT = {"encoding": "pcm16", "sample_rate": 16000, "channels": 1}
DEFAULT_OUTPUT = {"encoding": "pcm16", "sample_rate": 24000, "channels": 1}


def _format(spec: object, default: dict, what: str, max_channels: int) -> tuple[int, int]:
    """(sample_rate, channels) of a start message's input/output format."""
    spec = {**default, **(spec or {})} if isinstance(spec, dict) or spec is None else None
    if spec is None:
        raise ProtocolError(CLOSE_BAD_DATA, f"start.{what} must be an object")
    if spec["encoding"] != "pcm16":
        raise ProtocolError(CLOSE_UNSUPPORTED, f"unsupported codec {str(spec['encoding'])[:20]!r} for {what}; "
                                               f"binary frames are pcm16 (16-bit little-endian)")
    rate, channels = spec["sample_rate"], spec["channels"]
    if not isinstance(rate, int) or not 8000 <= rate <= 48000:
        raise ProtocolError(CLOSE_BAD_DATA, f"start.{what}.sample_rate must be an integer 8000-48000")
    if not isinstance(channels, int) or not 1 <= channels <= max_channels:
        raise ProtocolError(CLOSE_BAD_DATA, f"start.{what}.channels must be 1{' or 2' if max_channels == 2 else ''}")
    return rate, channels


def session_config(start: dict, settings, client: str) -> pb.SessionConfig:
    """A SessionConfig from a start message (shared with the WebRTC offer's `config`)."""
    text_fields = ("system_prompt", "voice", "language", "session_id")
    for name in text_fields:
        if name in start and not isinstance(start[name], str):
            raise ProtocolError(CLOSE_BAD_DATA, f"start.{name} must be a string")
    metadata = start.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ProtocolError(CLOSE_BAD_DATA, "start.metadata must be an object of strings")
    return pb.SessionConfig(
        session_id=start.get("session_id", ""),
        system_prompt=start.get("system_prompt") or settings.system_prompt,
        voice=start.get("voice") or settings.voice,
        language=start.get("language", ""),
        interim_transcripts=bool(start.get("interim_transcripts", True)),
        metrics=bool(start.get("metrics", True)),  # per-turn TTFB for the page's waterfall
        metadata={**metadata, "client": client},
    )


class BrowserSocket(WsSession):
    protocol = "websocket"

    async def on_text(self, text: str) -> None:
        if self.bridge is None:
            await self._start(events.parse_json(text, "start message"))
            return
        message = events.client_message(text)
        kind = message["type"]
        if kind == "text":
            await self.bridge.send_text(message["text"])
        elif kind == "dtmf":
            await self.bridge.send_dtmf(message["digit"])
        elif kind == "end":
            await self.bridge.end()
        elif kind == "cancel":
            await self.bridge.cancel()
        elif kind == "ping":
            await self.send_json(events.dumps({"type": "pong"}))

    async def _start(self, start: dict) -> None:
        if start.get("type") != "start":
            raise ProtocolError(CLOSE_POLICY, "the first message must be {\"type\": \"start\", ...}")
        in_rate, in_channels = _format(start.get("input"), DEFAULT_INPUT, "input", max_channels=2)
        out_rate, _ = _format(start.get("output"), DEFAULT_OUTPUT, "output", max_channels=1)
        config = session_config(start, self.server.settings, client="websocket")
        config.input_format.CopyFrom(pcm16(in_rate, in_channels))
        config.output_format.CopyFrom(pcm16(out_rate))
        self._frame_bytes = 2 * in_channels
        await self.open_bridge(config)  # SessionStarted reaches the client through event()

    async def on_binary(self, data: bytes) -> None:
        if self.bridge is None:
            raise ProtocolError(CLOSE_POLICY, "send the start message before audio")
        if not data or len(data) % self._frame_bytes:
            raise ProtocolError(CLOSE_BAD_DATA, f"binary frame of {len(data)} bytes is not whole pcm16 frames "
                                                f"({self._frame_bytes} bytes each)")
        await self.bridge.send_audio(data)

    # -- BridgeSink ----------------------------------------------------------------------------

    async def audio(self, data: bytes) -> None:
        await self.send_bytes(data)

    async def clear(self, turn_number: int) -> None:
        await self.send_json(events.dumps({"type": "clear", "turn": turn_number}))

    async def event(self, response: pb.ConverseResponse) -> None:
        if (event := event_json(response)) is not None:
            await self.send_json(events.dumps(event))


async def handle(request: web.Request) -> web.WebSocketResponse:
    return await serve(request, BrowserSocket)
