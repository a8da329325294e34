"""A fake Deepgram: the live-streaming WebSocket API (`/v1/listen`) and the REST calls a probe
makes, on 127.0.0.1, answering from an STT backend (tests/cloud/fakes/backends.py).

Wire protocol as Deepgram documents it: the handshake carries the settings in the query and
`Authorization: Token <key>`; a refused handshake is an HTTP status with a `dg-error` header and
a JSON body (`err_code`, `err_msg`). Then binary messages are audio; text messages are JSON
controls (`KeepAlive`, `Finalize`, `CloseStream`). The server answers `Results` (interims every
~300 ms of audio, a final with words at each Finalize, `from_finalize` true), and at CloseStream
the rest, `Metadata`, and a normal close. In-stream errors are close codes (1008 DATA-0000 for
audio it cannot decode, 1011 NET-0001 when nothing came for `idle_timeout_s`).

Recorded (FakeProvider.record): "auth" (the Authorization header), "request" (the query, a
dict of lists), "audio" (bytes of each binary message), "keepalive", "finalize",
"close_stream", then "closed" (it closed the stream after CloseStream) or "cancelled" (the
client dropped the connection without CloseStream), "probe" (the path). Each "closed" /
"cancelled" detail is the total audio bytes that connection carried.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any
from urllib.parse import parse_qs

from aiohttp import WSMsgType, web

from cloud.fakes.backends import ScriptedStt
from cloud.fakes.base import FakeProvider

MODELS = {  # model -> languages it has (a small part of Deepgram's list)
    "nova-3": {"en", "en-US", "en-GB", "en-AU", "en-IN", "es", "fr", "de", "multi"},
    "nova-2": {"en", "en-US", "en-GB", "es", "fr", "de", "ja", "hi"},
    "nova-3-medical": {"en", "en-US"},
}
ENCODINGS = {"linear16", "mulaw", "alaw", "flac", "opus", "amr-nb", "amr-wb", "speex", "g729"}
INTERIM_EVERY_MS = 300
FAILURES = {  # error class -> (HTTP status, err_code, err_msg), as Deepgram answers a handshake
    "auth": (401, "INVALID_AUTH", "Invalid credentials."),
    "throttle": (429, "TOO_MANY_REQUESTS", "Too many requests. Please try again later."),
    "not_found": (400, "Bad Request", "No such model/language/tier combination found."),
    "unavailable": (503, "SERVICE_UNAVAILABLE", "The service is temporarily unavailable."),
}


def _error(status: int, code: str, message: str) -> web.Response:
    request_id = str(uuid.uuid4())
    return web.json_response({"err_code": code, "err_msg": message, "request_id": request_id}, status=status,
                             headers={"dg-error": message, "dg-request-id": request_id})


class FakeDeepgram(FakeProvider):
    name = "deepgram"

    def __init__(self, backend=None, api_key: str = "dg-test-key", idle_timeout_s: float = 10.0):
        super().__init__()
        self.backend = backend or ScriptedStt()
        self.api_key = api_key  # the key it accepts; change it to make it refuse the service's
        self.idle_timeout_s = idle_timeout_s
        self.health = "Healthy"  # what /v1/status reports (self-hosted)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def endpoint(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a service needs to use this fake (the key by env; see also api_key_file)."""
        return {"VOICEMESH_STT_DEEPGRAM_ENDPOINT": self.endpoint, "DEEPGRAM_API_KEY": self.api_key}

    # --- lifecycle ---------------------------------------------------------------------------
    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/listen", self._listen)
        app.router.add_get("/v1/projects", self._projects)
        app.router.add_get("/v1/status", self._status)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - port 0 -> the one bound

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def clear(self) -> None:
        """Forget what was seen (a test's own events start here)."""
        with self._changed:
            self.events.clear()

    def go_away(self) -> None:
        """Stop listening (the provider is unreachable); `come_back()` listens on the same port again."""
        async def stop() -> None:
            await self._site.stop()
            await self._runner.server.shutdown(1.0)  # and the kept-alive connections with it
        self.call(stop())

    def come_back(self) -> None:
        async def start() -> None:
            self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await self._site.start()
        self.call(start())

    # --- REST --------------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization", "") == f"Token {self.api_key}"

    async def _projects(self, request: web.Request) -> web.Response:
        self.record("probe", request.path)
        if not self._authorized(request):
            return _error(401, "INVALID_AUTH", "Invalid credentials.")
        return web.json_response({"projects": [{"project_id": "3f1c-fake", "name": "voicemesh tests"}]})

    async def _status(self, request: web.Request) -> web.Response:
        self.record("probe", request.path)
        return web.json_response({"system_health": self.health, "active_batch_requests": 0, "active_stream_requests": 0})

    # --- streaming ---------------------------------------------------------------------------
    async def _listen(self, request: web.Request) -> web.StreamResponse:
        self.record("auth", request.headers.get("Authorization", ""))
        query = parse_qs(request.query_string, keep_blank_values=True)
        self.record("request", query)
        failure = self.take_failure()
        if failure in FAILURES:
            return _error(*FAILURES[failure])
        if not self._authorized(request):
            return _error(*FAILURES["auth"])
        refused = self._check_query(query)
        if refused is not None:
            return refused
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        await _Stream(self, ws, query, bad_audio=failure == "bad_format").run()
        return ws

    @staticmethod
    def _check_query(query: dict[str, list[str]]) -> web.Response | None:
        one = {name: values[-1] for name, values in query.items()}
        model, language = one.get("model", "nova-3"), one.get("language", "en")
        if model not in MODELS or language not in MODELS[model]:
            return _error(400, "Bad Request", "No such model/language/tier combination found.")
        if one.get("encoding", "linear16") not in ENCODINGS:
            return _error(400, "Bad Request", f"Unsupported encoding: {one['encoding']}")
        if not one.get("sample_rate", "16000").isdigit() or one.get("channels", "1") != "1":
            return _error(400, "Bad Request", "Invalid sample_rate or channels.")
        return None


class _Stream:
    """One /v1/listen connection."""

    def __init__(self, fake: FakeDeepgram, ws: web.WebSocketResponse, query: dict[str, list[str]], bad_audio: bool):
        self.fake = fake
        self.ws = ws
        self.rate = int(query.get("sample_rate", ["16000"])[-1])
        self.language = query.get("language", ["en"])[-1]
        self.interims = query.get("interim_results", ["false"])[-1] == "true"
        self.bad_audio = bad_audio
        self.total = 0  # bytes this connection carried
        self.segment = bytearray()  # audio since the last final
        self.segment_start = 0  # its offset in the connection, bytes
        self.since_interim = 0

    def _seconds(self, nbytes: int) -> float:
        return nbytes / (2 * self.rate)

    async def run(self) -> None:
        closed_by_us = False
        while True:
            try:
                message = await self.ws.receive(timeout=self.fake.idle_timeout_s)
            except asyncio.TimeoutError:
                await self.ws.close(code=1011, message=b"NET-0001")
                closed_by_us = True
                break
            if message.type == WSMsgType.BINARY:
                if not message.data or self.bad_audio:
                    await self.ws.close(code=1008, message=b"DATA-0000")
                    closed_by_us = True
                    break
                self.fake.record("audio", len(message.data))
                await self._audio(message.data)
            elif message.type == WSMsgType.TEXT:
                kind = json.loads(message.data).get("type")
                if kind == "KeepAlive":
                    self.fake.record("keepalive")
                elif kind == "Finalize":
                    self.fake.record("finalize")
                    if self.segment:  # like Deepgram: nothing buffered, no from_finalize result
                        await self._final(from_finalize=True)
                elif kind == "CloseStream":
                    self.fake.record("close_stream")
                    if self.segment:
                        await self._final(from_finalize=False)
                    await self.ws.send_json(self._metadata())
                    await self.ws.close(code=1000)
                    self.fake.record("closed", self.total)
                    return
            else:  # CLOSE / CLOSING / CLOSED / ERROR: the client went away
                break
        if not closed_by_us:
            self.fake.record("cancelled", self.total)
        else:
            self.fake.record("closed", self.total)

    async def _audio(self, data: bytes) -> None:
        self.total += len(data)
        self.segment += data
        self.since_interim += len(data)
        if self.interims and self.since_interim >= self.rate * 2 * INTERIM_EVERY_MS // 1000:
            self.since_interim = 0
            text = self.fake.backend.interim(bytes(self.segment), self.rate)
            if text:
                await self.ws.send_json(self._results(text, [], is_final=False, from_finalize=False))

    async def _final(self, from_finalize: bool) -> None:
        recognized = await self.fake.backend.recognize(bytes(self.segment), self.rate, self.language)
        offset = self._seconds(self.segment_start)
        words = [{"word": w.text.lower().strip(".,?!"), "start": offset + w.start_ms / 1000, "end": offset + w.end_ms / 1000,
                  "confidence": w.confidence, "punctuated_word": w.text} for w in recognized.words]
        result = self._results(recognized.text, words, is_final=True, from_finalize=from_finalize,
                               confidence=recognized.confidence)
        await self.ws.send_json(result)
        self.segment_start += len(self.segment)
        self.segment.clear()
        self.since_interim = 0

    def _results(self, text: str, words: list, is_final: bool, from_finalize: bool, confidence: float = 0.5) -> dict[str, Any]:
        start = self._seconds(self.segment_start)
        return {
            "type": "Results", "channel_index": [0, 1], "duration": self._seconds(len(self.segment)), "start": start,
            "is_final": is_final, "speech_final": is_final, "from_finalize": from_finalize,
            "channel": {"alternatives": [{"transcript": text, "confidence": confidence, "words": words}]},
            "metadata": {"request_id": str(uuid.uuid4()), "model_info": {"name": "general-nova-3"}},
        }

    def _metadata(self) -> dict[str, Any]:
        return {"type": "Metadata", "transaction_key": "deprecated", "request_id": str(uuid.uuid4()),
                "duration": self._seconds(self.total), "channels": 1}
