"""A fake Cartesia on 127.0.0.1: the TTS WebSocket (`/tts/websocket`, contexts multiplexed on
one connection) and the voice REST calls, with the documented message shapes.

WebSocket `/tts/websocket?cartesia_version=...`: the key in `X-API-Key` (or the `api_key`
query); each generation request `{"model_id", "transcript", "voice": {"mode": "id", "id"},
"output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate"}, "language",
"context_id", "continue", "add_timestamps"}` runs as its own task, answering
`{"type": "chunk", "data": base64, "done": false, "status_code": 206, "context_id"}` per backend
chunk, `{"type": "timestamps", "word_timestamps": {"words", "start", "end"}}` (seconds from the
context's first sample) and `{"type": "done", "done": true}`; `{"context_id", "cancel": true}`
stops that context. REST: `GET /voices`, `GET /voices/{id}`.

Failures, the way Cartesia fails: a bad key -> handshake 401; `fail_next` failures come in-stream
on the next generation request, as `{"type": "error", "error", "status_code", "done": true}`:
auth 401, throttle 429, not_found 404, bad_format 400, unavailable 500 (an unknown voice, model
or format fails the same way for real). REST never takes a `fail_next` failure; `outage`
("auth" or "unavailable") fails every call, the handshake included.

Recorded: "connection" (a new WebSocket: its number), "auth" (the key seen), "request"
(text, voice, model, format, language, context, speed fields), "chunk" (bytes), "done"
(context), "cancelled" (a cancel message: context), "closed" (a connection ended: its number
and the contexts still generating), "failed" (an in-stream error after audio: `error_after`),
"probe" (a REST path).
"""
from __future__ import annotations

import asyncio
import base64
import json

from aiohttp import WSMsgType, web

from cloud.fakes.backends import ToneTts
from cloud.fakes.base import FakeProvider

API_KEY = "sk_car_test_8d41e2"
VOICES = {"a0e99841-438c-4a64-b679-ae501e7d6091": "Barbershop Man", "694f9389-aac1-45b6-b726-9d9369183238": "Sarah"}
MODELS = ("sonic-2", "sonic-3", "sonic-latest", "sonic-turbo")
RATES = (8000, 16000, 22050, 24000, 44100, 48000)
LANGUAGES = ("en", "de", "es", "fr", "ja", "pt", "zh", "it", "nl", "pl", "ru", "sv", "tr", "hi", "ko")
IN_STREAM = {
    "auth": (401, "Invalid API key"),
    "throttle": (429, "Concurrency limit exceeded: too many concurrent generations for your plan"),
    "not_found": (404, "Voice not found"),
    "bad_format": (400, "Invalid output format: sample_rate is not supported"),
    "unavailable": (500, "Internal server error"),
}


class _Failed(Exception):
    """`error_after` chunks were sent: the context ends with an in-stream error."""


class FakeCartesia(FakeProvider):
    name = "cartesia"

    def __init__(self, backend=None, api_key: str = API_KEY, ms_per_char: float | None = None):
        super().__init__()
        self.backend = backend or ToneTts()
        self.api_key = api_key
        self.ms_per_char = ms_per_char or getattr(self.backend, "ms_per_char", 60)
        self.outage: str | None = None  # "auth" | "unavailable": every call fails so
        self.hold_after: int | None = None  # per context: send this many chunks, then wait for release()
        self.error_after: int | None = None  # per context: send this many chunks, then an in-stream 500 error
        self._release = asyncio.Event()
        self._connections = 0
        self._open: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a service needs to point at this fake."""
        return {"VOICEMESH_TTS_CARTESIA_ENDPOINT": self.endpoint, "CARTESIA_API_KEY": self.api_key}

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self._release.set)

    def hold(self, chunks: int | None) -> None:
        def apply() -> None:
            self.hold_after = chunks
            self._release.clear()
        self.loop.call_soon_threadsafe(apply)

    def drop_connections(self) -> None:
        """Close every open WebSocket from the server side, as Cartesia does to idle ones."""
        async def drop() -> None:
            for ws in list(self._open):
                await ws.close(code=1000, message=b"idle timeout")
        self.call(drop())

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/tts/websocket", self._websocket)
        app.router.add_get("/voices", self._voices)
        app.router.add_get("/voices/{voice_id}", self._voice)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.shutdown()
            await self._runner.cleanup()

    def _key(self, request: web.Request) -> str:
        return request.headers.get("X-API-Key") or request.query.get("api_key", "")

    def _refusal(self, request: web.Request) -> web.Response | None:
        if not (request.headers.get("Cartesia-Version") or request.query.get("cartesia_version")):
            return web.json_response({"error": "Missing Cartesia-Version"}, status=400)
        if self.outage == "unavailable":
            return web.json_response({"error": "Service unavailable"}, status=503)
        if self.outage == "auth" or self._key(request) != self.api_key:
            return web.json_response({"error": "Invalid API key"}, status=401)
        return None

    # -- REST ---------------------------------------------------------------------------
    async def _voices(self, request: web.Request) -> web.Response:
        self.record("probe", request.path)
        if refusal := self._refusal(request):
            return refusal
        return web.json_response([{"id": v, "name": n, "language": "en", "is_public": True} for v, n in VOICES.items()])

    async def _voice(self, request: web.Request) -> web.Response:
        self.record("probe", request.path)
        if refusal := self._refusal(request):
            return refusal
        voice = request.match_info["voice_id"]
        if voice not in VOICES:
            return web.json_response({"error": "Voice not found"}, status=404)
        return web.json_response({"id": voice, "name": VOICES[voice]})

    # -- WebSocket ------------------------------------------------------------------------
    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        self.record("auth", self._key(request))
        if refusal := self._refusal(request):
            return refusal
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._connections += 1
        number = self._connections
        self.record("connection", number)
        contexts: dict[str, asyncio.Task] = {}
        self._open.add(ws)
        try:
            await self._serve(ws, contexts)
        finally:
            self._open.discard(ws)
        active = [c for c, t in contexts.items() if not t.done()]
        for task in contexts.values():
            task.cancel()
        self.record("closed", {"connection": number, "active": active})
        return ws

    async def _serve(self, ws: web.WebSocketResponse, contexts: dict[str, asyncio.Task]) -> None:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            context = data.get("context_id", "")
            if data.get("cancel"):
                self.record("cancelled", context)
                if task := contexts.pop(context, None):
                    task.cancel()
                continue
            failure = self.take_failure()
            contexts[context] = asyncio.ensure_future(self._generate(ws, data, failure, contexts))

    async def _error(self, ws: web.WebSocketResponse, context: str, status: int, error: str) -> None:
        await ws.send_str(json.dumps({"type": "error", "done": True, "error": error, "status_code": status,
                                      "context_id": context}))

    async def _generate(self, ws: web.WebSocketResponse, data: dict, failure: str | None, contexts: dict) -> None:
        context = data.get("context_id", "")
        try:
            voice = (data.get("voice") or {}).get("id", "")
            fmt = data.get("output_format") or {}
            self.record("request", {"text": data.get("transcript", ""), "voice": voice, "model": data.get("model_id"),
                                    "format": fmt, "language": data.get("language"), "context": context,
                                    "continue": data.get("continue"), "generation_config": data.get("generation_config"),
                                    "controls": (data.get("voice") or {}).get("__experimental_controls")})
            if failure:
                return await self._error(ws, context, *IN_STREAM[failure])
            if data.get("model_id") not in MODELS:
                return await self._error(ws, context, 400, f"Invalid model: {data.get('model_id')} is not a valid model ID")
            if voice not in VOICES:
                return await self._error(ws, context, 404, f"Voice not found: {voice}")
            if (fmt.get("container"), fmt.get("encoding")) != ("raw", "pcm_s16le") or fmt.get("sample_rate") not in RATES:
                return await self._error(ws, context, 400, f"Invalid output format: {json.dumps(fmt)}")
            if data.get("language") not in LANGUAGES:
                return await self._error(ws, context, 400, f"Unsupported language: {data.get('language')}")
            try:
                await self._speak(ws, context, data.get("transcript", ""), fmt["sample_rate"])
            except _Failed:
                return await self._error(ws, context, 500, "Internal server error during generation")
            await ws.send_str(json.dumps({"type": "done", "done": True, "status_code": 206, "context_id": context}))
            self.record("done", context)
        except (ConnectionError, RuntimeError):
            pass  # the client went
        finally:
            if contexts.get(context) is asyncio.current_task():
                del contexts[context]

    async def _speak(self, ws: web.WebSocketResponse, context: str, text: str, rate: int) -> None:
        words, position = [], 0
        for word in text.split():
            position = text.index(word, position)
            words.append((word, position * self.ms_per_char / 1000.0))
            position += len(word)
        sent_words, sent_s, count = 0, 0.0, 0
        pending: bytes | None = None

        async def send(pcm: bytes, last: bool) -> None:
            nonlocal sent_words, sent_s, count
            await ws.send_str(json.dumps({"type": "chunk", "data": base64.b64encode(pcm).decode(), "done": False,
                                          "status_code": 206, "step_time": 1, "context_id": context}))
            self.record("chunk", len(pcm))
            duration = len(pcm) / (2 * rate)
            end = len(words) if last else sum(1 for _, start in words if start < sent_s + duration)
            if end > sent_words:
                batch = words[sent_words:end]
                await ws.send_str(json.dumps({"type": "timestamps", "done": False, "status_code": 206, "context_id": context,
                                              "word_timestamps": {"words": [w for w, _ in batch],
                                                                  "start": [round(s, 3) for _, s in batch],
                                                                  "end": [round(s + len(w) * self.ms_per_char / 1000, 3)
                                                                          for w, s in batch]}}))
            sent_words, sent_s, count = end, sent_s + duration, count + 1

        async for pcm in self.backend.synthesize(text, rate):
            if pending is not None:
                await send(pending, last=False)
                if self.error_after is not None and count >= self.error_after:
                    self.record("failed", context)
                    raise _Failed
                if self.hold_after is not None and count >= self.hold_after:
                    await self._release.wait()
            pending = pcm
        if pending is not None:
            await send(pending, last=True)
