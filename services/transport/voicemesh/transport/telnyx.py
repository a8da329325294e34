"""Telnyx media streaming at /telnyx: PCMU (μ-law) 8 kHz or L16, base64 in JSON events.

From Telnyx: connected, start (stream_id, start.call_control_id, start.media_format), media,
dtmf, mark, error, stop. To Telnyx (bidirectional mode "rtp"): media, mark, clear.
"""
from __future__ import annotations

import aiohttp
from aiohttp import web

from voicemesh.transport.bridge import mulaw, pcm16
from voicemesh.transport.events import CLOSE_UNSUPPORTED, ProtocolError
from voicemesh.transport.telephony import TelephonySession, require_dict
from voicemesh.transport.wsbase import serve

L16_RATES = (8000, 16000, 24000, 48000)


class TelnyxStream(TelephonySession):
    protocol = "telnyx"

    def parse_start(self, message: dict):
        start = require_dict(message, "start")
        self.stream_id = str(message.get("stream_id") or "")
        self.call_id = str(start.get("call_control_id") or "")
        media_format = start.get("media_format") or {}
        encoding, rate = media_format.get("encoding"), media_format.get("sample_rate", 8000)
        if media_format.get("channels", 1) != 1:
            raise ProtocolError(CLOSE_UNSUPPORTED, "Telnyx streams must be mono")
        if encoding == "PCMU" and rate == 8000:
            fmt = mulaw(8000)
        elif encoding == "L16" and rate in L16_RATES:
            fmt, self.big_endian = pcm16(rate), True
        else:
            raise ProtocolError(CLOSE_UNSUPPORTED, f"unsupported codec {encoding!r} at {rate!r} Hz; "
                                                   "use PCMU at 8000 Hz or L16 at 8/16/24/48 kHz")
        parameters = start.get("custom_parameters") or {}
        return fmt, parameters if isinstance(parameters, dict) else {}

    def out_media(self, payload: str) -> dict:
        return {"event": "media", "media": {"payload": payload}}

    def out_clear(self) -> dict:
        return {"event": "clear"}

    def out_mark(self, name: str) -> dict:
        return {"event": "mark", "mark": {"name": name}}

    async def hang_up(self, http: aiohttp.ClientSession) -> bool:
        settings = self.server.settings
        if not (settings.telnyx_api_key and self.call_id):
            return False
        url = f"{settings.telnyx_api_base}/v2/calls/{self.call_id}/actions/hangup"
        async with http.post(url, json={}, headers={"Authorization": f"Bearer {settings.telnyx_api_key}"}) as reply:
            if reply.status >= 300 and reply.status != 422:  # 422: the call has already ended
                raise aiohttp.ClientError(f"Telnyx answered {reply.status}: {(await reply.text())[:200]}")
        return True


async def handle(request: web.Request) -> web.WebSocketResponse:
    return await serve(request, TelnyxStream)
