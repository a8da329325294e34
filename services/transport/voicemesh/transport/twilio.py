"""Twilio Media Streams at /twilio: μ-law 8 kHz, base64 in JSON events.

From Twilio: connected, start, media, dtmf, mark, stop. To Twilio: media, mark, clear.
Point a TwiML `<Connect><Stream url="wss://HOST/twilio"/></Connect>` here.
"""
from __future__ import annotations

import aiohttp
from aiohttp import web

from voicemesh.transport.bridge import mulaw
from voicemesh.transport.events import CLOSE_UNSUPPORTED, ProtocolError
from voicemesh.transport.telephony import TelephonySession, require_dict
from voicemesh.transport.wsbase import serve


class TwilioStream(TelephonySession):
    protocol = "twilio"

    def parse_start(self, message: dict):
        start = require_dict(message, "start")
        self.stream_id = str(start.get("streamSid") or message.get("streamSid") or "")
        self.call_id = str(start.get("callSid") or "")
        media_format = start.get("mediaFormat") or {}
        encoding, rate = media_format.get("encoding"), media_format.get("sampleRate")
        if encoding != "audio/x-mulaw" or rate != 8000 or media_format.get("channels", 1) != 1:
            raise ProtocolError(CLOSE_UNSUPPORTED, f"unsupported codec {encoding!r} at {rate!r} Hz; "
                                                   "Twilio streams must be audio/x-mulaw at 8000 Hz mono")
        parameters = start.get("customParameters") or {}
        return mulaw(8000), parameters if isinstance(parameters, dict) else {}

    def out_media(self, payload: str) -> dict:
        return {"event": "media", "streamSid": self.stream_id, "media": {"payload": payload}}

    def out_clear(self) -> dict:
        return {"event": "clear", "streamSid": self.stream_id}

    def out_mark(self, name: str) -> dict:
        return {"event": "mark", "streamSid": self.stream_id, "mark": {"name": name}}

    async def hang_up(self, http: aiohttp.ClientSession) -> bool:
        settings = self.server.settings
        if not (settings.twilio_account_sid and settings.twilio_auth_token and self.call_id):
            return False
        url = f"{settings.twilio_api_base}/2010-04-01/Accounts/{settings.twilio_account_sid}/Calls/{self.call_id}.json"
        auth = aiohttp.BasicAuth(settings.twilio_account_sid, settings.twilio_auth_token)
        async with http.post(url, data={"Status": "completed"}, auth=auth) as reply:
            if reply.status >= 300:
                raise aiohttp.ClientError(f"Twilio answered {reply.status}: {(await reply.text())[:200]}")
        return True


async def handle(request: web.Request) -> web.WebSocketResponse:
    return await serve(request, TwilioStream)
