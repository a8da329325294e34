"""A fake ElevenLabs on 127.0.0.1: the text-to-speech WebSocket (`stream-input`) and the voice
REST calls, with the documented message shapes.

WebSocket `/v1/text-to-speech/{voice_id}/stream-input?model_id=&output_format=pcm_<rate>`:
the key in the `xi-api-key` header (or `xi_api_key` in the first message); the client sends
`{"text": " ", ...}`, text messages (`flush`) and `{"text": ""}`; the fake answers
`{"audio": base64 PCM, "alignment": {"chars", "charStartTimesMs", "charDurationsMs"},
"normalizedAlignment": ...}` per backend chunk (times relative to the chunk, as documented)
and `{"isFinal": true}`, then closes. REST: `GET /v1/voices`, `GET /v1/voices/{id}`.

Failures, the way ElevenLabs fails: auth -> handshake 401, throttle -> handshake 429,
unavailable -> handshake 503, not_found -> an in-stream `{"message", "error", "code": 1008}`
and a 1008 close, bad_format -> a 1008 close whose reason names the format. An unknown voice,
model or format fails the same way for real. REST calls never take a `fail_next` failure
(the service probes in the background); `outage` ("auth" or "unavailable") fails every call.

Recorded: "auth" (the key seen), "request" (text, voice, model, format, language,
voice_settings), "chunk" (bytes sent), "done" (final sent), "closed" (the client went before
the final), "failed" (an in-stream error sent after audio: `error_after`), "probe" (a REST path).
"""
from __future__ import annotations

import asyncio
import base64
import json

from aiohttp import WSMsgType, web

from cloud.fakes.backends import ToneTts
from cloud.fakes.base import FakeProvider

API_KEY = "el-test-key-5f3a9c"
VOICES = {"JBFqnCBsd6RMkjVDRZzb": "George", "21m00Tcm4TlvDq8ikWAM": "Rachel"}
MODELS = ("eleven_flash_v2_5", "eleven_turbo_v2_5", "eleven_multilingual_v2")
FORMATS = {"pcm_8000": 8000, "pcm_16000": 16000, "pcm_22050": 22050, "pcm_24000": 24000, "pcm_44100": 44100}
HANDSHAKE = {
    "auth": (401, "invalid_api_key", "Invalid API key"),
    "throttle": (429, "too_many_concurrent_requests", "Too many concurrent requests for your subscription"),
    "unavailable": (503, "service_unavailable", "The service is temporarily unavailable"),
}


def _detail(status: str, message: str) -> dict:
    return {"detail": {"status": status, "message": message}}


class FakeElevenLabs(FakeProvider):
    name = "elevenlabs"

    def __init__(self, backend=None, api_key: str = API_KEY, ms_per_char: float | None = None):
        super().__init__()
        self.backend = backend or ToneTts()
        self.api_key = api_key
        # Alignment spreads the text's characters evenly at this pace (the tone's own, by default).
        self.ms_per_char = ms_per_char or getattr(self.backend, "ms_per_char", 60)
        self.outage: str | None = None  # "auth" | "unavailable": every call fails so, REST included
        self.hold_after: int | None = None  # send this many chunks, then wait for release() or the client to go
        self.error_after: int | None = None  # send this many chunks, then an in-stream error and a 1011 close
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a service needs to point at this fake."""
        return {"VOICEMESH_TTS_ELEVENLABS_ENDPOINT": self.endpoint, "ELEVENLABS_API_KEY": self.api_key}

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self._release.set)

    def hold(self, chunks: int | None) -> None:
        def apply() -> None:
            self.hold_after = chunks
            self._release.clear()
        self.loop.call_soon_threadsafe(apply)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/text-to-speech/{voice_id}/stream-input", self._stream_input)
        app.router.add_get("/v1/voices", self._voices)
        app.router.add_get("/v1/voices/{voice_id}", self._voice)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- REST ---------------------------------------------------------------------------
    def _rest_refusal(self, request: web.Request) -> web.Response | None:
        self.record("probe", request.path)
        if self.outage == "unavailable":
            return web.json_response(_detail("service_unavailable", "down for maintenance"), status=503)
        if self.outage == "auth" or request.headers.get("xi-api-key") != self.api_key:
            return web.json_response(_detail("invalid_api_key", "Invalid API key"), status=401)
        return None

    async def _voices(self, request: web.Request) -> web.Response:
        if refusal := self._rest_refusal(request):
            return refusal
        return web.json_response({"voices": [{"voice_id": v, "name": n, "category": "premade"} for v, n in VOICES.items()]})

    async def _voice(self, request: web.Request) -> web.Response:
        if refusal := self._rest_refusal(request):
            return refusal
        voice = request.match_info["voice_id"]
        if voice not in VOICES:
            return web.json_response(_detail("voice_not_found", f"A voice with the voice_id {voice} was not found."), status=404)
        return web.json_response({"voice_id": voice, "name": VOICES[voice]})

    # -- WebSocket ------------------------------------------------------------------------
    async def _stream_input(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("xi-api-key", "")
        self.record("auth", key)
        failure = self.outage or self.take_failure()
        if failure in HANDSHAKE:
            status, code, message = HANDSHAKE[failure]
            return web.json_response(_detail(code, message), status=status)
        voice = request.match_info["voice_id"]
        model = request.query.get("model_id", "")
        fmt = request.query.get("output_format", "mp3_44100_128")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        first = await self._receive(ws)
        if first is None:
            return ws
        if key != self.api_key and first.get("xi_api_key") != self.api_key:
            await ws.close(code=1008, message=b"invalid_api_key: Invalid API key")  # a key in the message, but a bad one
            return ws
        if failure == "not_found" or voice not in VOICES or model not in MODELS:
            what, name = ("voice_id", voice) if failure == "not_found" or voice not in VOICES else ("model_id", model)
            error = "voice_not_found" if what == "voice_id" else "model_not_found"
            await ws.send_str(json.dumps({"message": f"The {what} '{name}' was not found", "error": error, "code": 1008}))
            await ws.close(code=1008, message=f"{error}: {name} was not found".encode())
            return ws
        if failure == "bad_format" or fmt not in FORMATS:
            await ws.close(code=1008, message=f"Invalid output format '{fmt}'".encode())
            return ws
        text_parts = []
        while (message := await self._receive(ws)) is not None:
            text = message.get("text", "")
            if text == "":
                break
            text_parts.append(text)
        else:
            return ws
        text = "".join(text_parts).strip()
        self.record("request", {"text": text, "voice": voice, "model": model, "format": fmt,
                                "language": request.query.get("language_code", ""),
                                "voice_settings": first.get("voice_settings")})
        gone = asyncio.ensure_future(self._drain(ws))  # the client's close arrives here
        try:
            outcome = await self._speak(ws, text, FORMATS[fmt], gone)
        finally:
            gone.cancel()
        if outcome == "finished":
            await ws.send_str(json.dumps({"isFinal": True}))
            self.record("done", text)
            await ws.close()
        elif outcome == "gone":
            self.record("closed", text)
        return ws

    async def _speak(self, ws: web.WebSocketResponse, text: str, rate: int, gone: asyncio.Future) -> str:
        """Stream the backend's audio with alignment: "finished", "gone" (the client went first) or "failed"."""
        starts = [i * self.ms_per_char for i in range(len(text))]  # each char's start in the whole audio
        sent_chars, sent_ms, count = 0, 0.0, 0
        pending: bytes | None = None  # one chunk of lookahead: the last one takes the remaining chars

        async def send(pcm: bytes, last: bool) -> None:
            nonlocal sent_chars, sent_ms, count
            duration = len(pcm) * 1000 / (2 * rate)
            end = len(text) if last else sum(1 for s in starts if s < sent_ms + duration)
            chars = list(text[sent_chars:end])
            rel = [max(0, round(min(s - sent_ms, duration))) for s in starts[sent_chars:end]]
            align = {"chars": chars, "charStartTimesMs": rel, "charDurationsMs": [round(self.ms_per_char)] * len(chars)}
            await ws.send_str(json.dumps({"audio": base64.b64encode(pcm).decode(), "isFinal": None,
                                          "alignment": align, "normalizedAlignment": align}))
            self.record("chunk", len(pcm))
            sent_chars, sent_ms, count = end, sent_ms + duration, count + 1

        async for pcm in self.backend.synthesize(text, rate):
            if gone.done():
                return "gone"
            if pending is not None:
                await send(pending, last=False)
                if self.error_after is not None and count >= self.error_after:
                    await ws.send_str(json.dumps({"message": "An internal server error occurred", "error": "internal_error",
                                                  "code": 1011}))
                    await ws.close(code=1011, message=b"internal_error")
                    self.record("failed", text)
                    return "failed"
                if self.hold_after is not None and count >= self.hold_after:
                    await asyncio.wait({gone, asyncio.ensure_future(self._release.wait())},
                                       return_when=asyncio.FIRST_COMPLETED)
                    if gone.done():
                        return "gone"
            pending = pcm
        if pending is not None and not gone.done():
            await send(pending, last=True)
        return "gone" if gone.done() else "finished"

    async def _receive(self, ws: web.WebSocketResponse) -> dict | None:
        msg = await ws.receive()
        if msg.type != WSMsgType.TEXT:
            return None
        return json.loads(msg.data)

    async def _drain(self, ws: web.WebSocketResponse) -> None:
        async for _ in ws:
            pass
