"""What carrier media streams share (Twilio, Telnyx): JSON events over a WebSocket with
base64 audio, `clear` on barge-in, marks to know when playback finished, DTMF, and an
optional REST hang-up when the session ends. A carrier module supplies its dialect.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging

import aiohttp
import numpy as np

from voicemesh.runtime.telemetry import content_enabled
from voicemesh.transport import events
from voicemesh.transport.events import CLOSE_BAD_DATA, CLOSE_POLICY, CLOSE_UNSUPPORTED, ProtocolError
from voicemesh.transport.wsbase import WsSession
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb

log = logging.getLogger("voicemesh.transport.telephony")
MARK_WAIT_SECONDS = 10.0  # at most this long for the last bot audio to play before hanging up


class TelephonySession(WsSession):
    """Dialect hooks: parse_start, media_payload, out_media, out_clear, out_mark, hang_up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream_id = ""
        self.call_id = ""
        self.big_endian = False  # L16 on the wire is network byte order
        self._marks_pending: set[str] = set()
        self._marks_done = asyncio.Event()
        self._mark_seq = 0

    # -- dialect -----------------------------------------------------------------------------

    def parse_start(self, message: dict) -> tuple[common_pb2.AudioFormat, dict[str, str]]:
        """Sets stream_id/call_id; returns the call's audio format and custom parameters."""
        raise NotImplementedError

    def media_payload(self, message: dict) -> str | None:
        """The base64 payload of an inbound-track media message (None: other track, skip)."""
        media = message.get("media")
        if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
            raise ProtocolError(CLOSE_BAD_DATA, "media message without media.payload")
        track = media.get("track", "inbound")
        return media["payload"] if track in ("inbound", "inbound_track") else None

    def dtmf_digit(self, message: dict) -> str:
        dtmf = message.get("dtmf")
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not isinstance(digit, str) or digit not in events.DTMF_DIGITS:
            raise ProtocolError(CLOSE_BAD_DATA, "dtmf message needs dtmf.digit, one of 0-9 * # A-D")
        return digit

    def out_media(self, payload: str) -> dict:
        raise NotImplementedError

    def out_clear(self) -> dict:
        raise NotImplementedError

    def out_mark(self, name: str) -> dict:
        raise NotImplementedError

    async def hang_up(self, http: aiohttp.ClientSession) -> bool:
        """End the call through the carrier's REST API; False when no credentials are set."""
        return False

    # -- inbound -----------------------------------------------------------------------------

    async def on_binary(self, data: bytes) -> None:
        raise ProtocolError(CLOSE_UNSUPPORTED, f"{self.protocol} media streams send JSON text messages, not binary")

    async def on_text(self, text: str) -> None:
        message = events.parse_json(text, f"{self.protocol} message")
        kind = message.get("event")
        if kind == "connected":
            return
        if kind == "start":
            if self.bridge is not None:
                raise ProtocolError(CLOSE_POLICY, "start sent twice")
            await self._start(message)
        elif kind in ("media", "dtmf", "mark") and self.bridge is None:
            raise ProtocolError(CLOSE_POLICY, f"{kind} before start")
        elif kind == "media":
            if (payload := self.media_payload(message)) is not None:
                await self.bridge.send_audio(self._decode(payload))
        elif kind == "dtmf":
            await self.bridge.send_dtmf(self.dtmf_digit(message))
        elif kind == "mark":
            self._mark_played(message)
        elif kind == "stop":
            log.info("call stopped", extra={"connection": self.connection.label, "call": self.call_id})
            raise ProtocolError(events.CLOSE_NORMAL, "call ended by the carrier")
        elif kind == "error":
            log.warning("carrier error", extra={"connection": self.connection.label, "error": message})
        else:
            raise ProtocolError(CLOSE_POLICY, f"unknown event {str(kind)[:32]!r}")

    async def _start(self, message: dict) -> None:
        fmt, parameters = self.parse_start(message)
        config = pb.SessionConfig(
            system_prompt=self.server.settings.system_prompt,
            voice=self.server.settings.voice,
            interim_transcripts=True,
            metadata={**{k: str(v)[:200] for k, v in parameters.items()}, "client": self.protocol, "call": self.call_id},
        )
        config.input_format.CopyFrom(fmt)
        config.output_format.CopyFrom(fmt)  # the orchestrator speaks the call's codec directly
        self._frame_bytes = 2 if fmt.encoding == common_pb2.AUDIO_ENCODING_PCM16 else 1
        await self.open_bridge(config)
        log.info("call started", extra={"connection": self.connection.label, "call": self.call_id,
                                        "stream": self.stream_id, "session_id": self.bridge.session_id})

    def _decode(self, payload: str) -> bytes:
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(CLOSE_BAD_DATA, "media.payload is not valid base64") from None
        if not data or len(data) % self._frame_bytes:
            raise ProtocolError(CLOSE_BAD_DATA, f"media payload of {len(data)} bytes is not whole samples")
        return np.frombuffer(data, ">i2").astype("<i2").tobytes() if self.big_endian else data

    def _mark_played(self, message: dict) -> None:
        mark = message.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        self._marks_pending.discard(name)
        log.info("mark played", extra={"connection": self.connection.label, "mark": name})
        if not self._marks_pending:
            self._marks_done.set()

    # -- BridgeSink ----------------------------------------------------------------------------

    async def audio(self, data: bytes) -> None:
        if self.big_endian:
            data = np.frombuffer(data, "<i2").astype(">i2").tobytes()
        await self.send_json(events.dumps(self.out_media(base64.b64encode(data).decode("ascii"))))

    async def clear(self, turn_number: int) -> None:
        await self.send_json(events.dumps(self.out_clear()))

    async def event(self, response: pb.ConverseResponse) -> None:
        speaking = response.speaking if response.WhichOneof("event") == "speaking" else None
        if speaking is not None and speaking.kind == pb.SpeakingEvent.KIND_BOT_STOPPED:
            # The carrier echoes the mark once the audio before it has played.
            self._mark_seq += 1
            name = f"turn-{speaking.turn_number}-{self._mark_seq}"
            self._marks_pending.add(name)
            self._marks_done.clear()
            await self.send_json(events.dumps(self.out_mark(name)))
        if (event := events.event_json(response)) is not None and event["type"] in ("user_transcript", "bot_text", "error"):
            if event["type"] != "error" and not content_enabled():  # what was said stays out of logs too
                event = {**event, "text": f"<{len(event.get('text', ''))} characters>"}
            log.info(event["type"], extra={"connection": self.connection.label, "event": event})

    async def on_session_over(self) -> None:
        """Let the last reply play out, then hang up the call (when credentials are set)."""
        if self._marks_pending:
            try:
                await asyncio.wait_for(self._marks_done.wait(), MARK_WAIT_SECONDS)
            except asyncio.TimeoutError:
                log.info("marks not returned; hanging up anyway", extra={"connection": self.connection.label})
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                if await self.hang_up(http):
                    log.info("call hung up", extra={"connection": self.connection.label, "call": self.call_id})
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            log.warning("hang-up failed", extra={"connection": self.connection.label, "error": str(err)})


def require_dict(message: dict, name: str) -> dict:
    value = message.get(name)
    if not isinstance(value, dict):
        raise ProtocolError(CLOSE_BAD_DATA, f"start message needs an object {name!r}")
    return value
