"""Cartesia Sonic TTS over its documented WebSocket API (`/tts/websocket`), with aiohttp as the
client: no vendor SDK, so nothing but aiohttp (Apache-2.0) is installed.

How the API maps onto `TtsProvider.synthesize` (one call = one sentence):
- One generation request per call, on a context of its own (`context_id`, `"continue": false`):
  the sentence is complete, so nothing is streamed in after it. The server answers
  `{"type": "chunk", "data": base64 PCM}` as it generates, `{"type": "timestamps",
  "word_timestamps": {"words", "start", "end"}}` (seconds from the context's first sample),
  then `{"type": "done"}`; chunks are yielded as they arrive, timestamps as WordMarks.
- Connections are pooled: one WebSocket carries many contexts, so a sentence reuses an idle
  socket instead of paying a handshake. Each socket serves one call at a time (it is leased),
  so no reader task has to demultiplex: the lease reads its own socket and drops any message
  whose context_id is not its own. A socket goes back to the pool only after its context's
  `done`; idle ones are dropped after `idle_seconds` (the server closes them after 5 min), and
  a pooled socket that turns out dead is replaced by a fresh one before the request counts.
- Cancel (the caller stopped listening, or barge-in): `{"context_id", "cancel": true}`, then the
  socket is closed. The docs say a cancel only halts work not yet started; closing the socket
  also stops the context already generating, and only this call used that socket.
- Format: `output_format {"container": "raw", "encoding": "pcm_s16le", "sample_rate"}`;
  `sample_rate_hz` follows the setting (the servicer resamples and converts to mu-law).
- Speed: sonic-3 and later take `generation_config.speed` (0.6-1.5, a multiplier); sonic-2 and
  older take `voice.__experimental_controls.speed` (-1 to 1, 0 = normal), mapped from the
  multiplier as speed - 1 (clamped).
- Errors: a refused handshake by HTTP status, an in-stream `{"type": "error", "error",
  "status_code"}` by its status (wsclient.classify). Opening (socket and first answer) is
  retried on transient failures; once audio has gone out a failure is final.
- Health: `probe()` GETs the configured voice (`/voices/{id}`): the key and the voice at once.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

import aiohttp

from voicemesh.runtime.errors import InvalidInput, StreamError, Unavailable
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.upstream import Secret, open_with_retry, read_secret
from voicemesh.tts.providers import wsclient
from voicemesh.tts.providers.base import SynthesisRequest, TtsProvider, WordMark

log = logging.getLogger(__name__)

NAME = "cartesia"
KEY_ENV = ("CARTESIA_API_KEY",)
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
MIN_SPEED_3, MAX_SPEED_3 = 0.6, 1.5  # generation_config.speed on sonic-3
PROBE_CALL_S = 4.0  # per REST call of a probe: two fit in the runtime's 10 s probe deadline


@dataclass
class CartesiaSettings:
    endpoint: str = field(default="https://api.cartesia.ai", metadata={
        "help": "API base URL (WebSocket and REST); http://host:port for a proxy or a self-hosted gateway"})
    version: str = field(default="2024-11-13", metadata={"help": "Cartesia-Version, the API version date"})
    model: str = field(default="sonic-2", metadata={"help": "model id (sonic-2, sonic-3, sonic-latest, ...)"})
    voice: str = field(default="a0e99841-438c-4a64-b679-ae501e7d6091", metadata={
        "help": "default voice id (a call may name another)"})
    language: str = field(default="en", metadata={"help": "language when a call names none (ISO 639-1: en, de, fr, ...)"})
    sample_rate_hz: int = field(default=24000, metadata={
        "help": "PCM rate asked of Cartesia: 8000, 16000, 22050, 24000, 44100 or 48000"})
    api_key_file: str = field(default="", metadata={"help": "file holding the API key (else CARTESIA_API_KEY)"})
    timeout_seconds: float = field(default=10.0, metadata={
        "help": "deadline to connect, for the first audio and between messages; also bounds the probe"})
    pool_size: int = field(default=4, metadata={"help": "idle WebSockets kept for reuse (0: a new one per sentence)"})
    idle_seconds: float = field(default=60.0, metadata={"help": "an idle pooled WebSocket older than this is closed"})


def speed_fields(model: str, speed: float) -> dict:
    """The request fields for a speed multiplier, by model family (empty for normal speed)."""
    if speed == 1.0:
        return {}
    family = model.removeprefix("sonic-").split("-")[0].split(".")[0]
    if family.isdigit() and int(family) >= 3 or family == "latest":
        if not MIN_SPEED_3 <= speed <= MAX_SPEED_3:
            raise InvalidInput(f"{NAME}: speed {speed:g} is outside {MIN_SPEED_3}-{MAX_SPEED_3}, the range {model} supports")
        return {"generation_config": {"speed": speed}}
    return {"__experimental_controls": {"speed": max(-1.0, min(1.0, round(speed - 1.0, 3)))}}


class _Pool:
    """Idle WebSockets, newest first; each is leased to one call at a time."""

    def __init__(self, size: int, idle_s: float):
        self.size, self.idle_s = size, idle_s
        self._idle: list[tuple[float, aiohttp.ClientWebSocketResponse]] = []

    def take(self) -> aiohttp.ClientWebSocketResponse | None:
        now = time.monotonic()
        while self._idle:
            since, ws = self._idle.pop()
            if not ws.closed and now - since < self.idle_s:
                return ws
            asyncio.ensure_future(ws.close())
        return None

    async def give(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        if ws.closed or len(self._idle) >= self.size:
            await ws.close()
        else:
            self._idle.append((time.monotonic(), ws))

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, ws in idle:
            await ws.close()


class CartesiaTtsProvider(TtsProvider):
    """Cartesia streaming TTS (see the module docstring for how the API maps)."""

    name = NAME
    settings_class = CartesiaSettings

    def __init__(self, settings: CartesiaSettings):
        self.settings = settings
        if settings.sample_rate_hz not in SAMPLE_RATES:
            rates = ", ".join(map(str, SAMPLE_RATES))
            raise SystemExit(f"{NAME}: sample_rate_hz {settings.sample_rate_hz} is not one of {rates}")
        self.sample_rate_hz = settings.sample_rate_hz
        self.key: Secret = read_secret(settings.api_key_file, KEY_ENV, NAME)
        self.rest = settings.endpoint.rstrip("/")
        self.ws_url = f"{wsclient.ws_base(self.rest)}/tts/websocket?{urlencode({'cartesia_version': settings.version})}"
        self._session: aiohttp.ClientSession | None = None
        self._pool = _Pool(settings.pool_size, settings.idle_seconds)
        self._voices: list[str] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key.reveal(), "Cartesia-Version": self.settings.version}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:  # created on the serving loop, at first use
            self._session = aiohttp.ClientSession()
        return self._session

    async def load(self) -> None:
        # Never fatal: bad credentials or an outage at start-up show as NOT_SERVING (probe).
        try:
            await self._list_voices()
        except StreamError as err:
            log.warning("%s: voice list not read at start-up: %s", NAME, err.message)

    async def _list_voices(self, timeout_s: float = 0.0) -> None:
        data = await wsclient.get_json(self._http(), f"{self.rest}/voices", self._headers(), NAME,
                                       timeout_s or self.settings.timeout_seconds)
        if isinstance(data, dict):  # newer versions page the list: a partial list cannot reject voices
            items = data.get("data", []) if not data.get("has_more") else []
        else:
            items = data if isinstance(data, list) else []
        self._voices = [v["id"] for v in items if isinstance(v, dict) and v.get("id")]
        log.info("%s: %d voices available", NAME, len(self._voices))

    async def probe(self) -> str | None:
        try:
            if self._voices is None:
                await self._list_voices(PROBE_CALL_S)
            url = f"{self.rest}/voices/{quote(self.settings.voice, safe='')}"
            await wsclient.get_json(self._http(), url, self._headers(), NAME, PROBE_CALL_S)
        except StreamError as err:
            return err.message
        return None

    async def close(self) -> None:
        await self._pool.close()
        if self._session is not None:
            await self._session.close()

    def info(self) -> ProviderInfo:
        return ProviderInfo(
            provider=NAME, model=self.settings.model, sample_rates_hz=(self.sample_rate_hz,),
            details={"voice": self.settings.voice, "endpoint": self.rest, "api_version": self.settings.version,
                     "output_format": f"raw pcm_s16le {self.sample_rate_hz}", "language": self.settings.language,
                     "credentials": self.key.source},
        )

    def voices(self) -> list[str]:
        if not self._voices:
            return []  # unknown (not listed, or a paged list): the provider itself judges the voice
        return sorted(set(self._voices) | {self.settings.voice})

    # -- synthesis ------------------------------------------------------------------------

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[bytes | WordMark]:
        text = request.text.strip()
        if not text:
            return
        context = uuid.uuid4().hex
        voice: dict = {"mode": "id", "id": request.voice or self.settings.voice}
        body: dict = {
            "model_id": self.settings.model, "transcript": text, "voice": voice,
            "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": self.sample_rate_hz},
            "language": (request.language or self.settings.language).split("-")[0].lower(),
            "context_id": context, "continue": False, "add_timestamps": True,
        }
        extra = speed_fields(self.settings.model, request.speed or 1.0)
        if controls := extra.pop("__experimental_controls", None):
            voice["__experimental_controls"] = controls
        body.update(extra)

        ws, first = await open_with_retry(lambda: self._open(body), f"{NAME}: open a synthesis")
        done = False
        carry = b""
        try:
            message = first
            while True:
                kind = message.get("type")
                if kind == "error" or (message.get("error") and kind != "chunk"):
                    raise _error(message)
                if kind == "chunk" and message.get("data"):
                    pcm = carry + base64.b64decode(message["data"])
                    cut = len(pcm) - len(pcm) % 2
                    carry = pcm[cut:]
                    if cut:
                        yield pcm[:cut]
                elif kind == "timestamps":
                    stamps = message.get("word_timestamps") or {}
                    for word, start in zip(stamps.get("words") or [], stamps.get("start") or [], strict=False):
                        yield WordMark(str(word), float(start) * 1000.0)
                if kind == "done" or message.get("done"):
                    done = True
                    break
                message = await self._next(ws, context, "the end of the audio")
        finally:
            if done:
                await self._pool.give(ws)
            else:
                await self._cancel(ws, context)

    async def _open(self, body: dict) -> tuple[aiohttp.ClientWebSocketResponse, dict]:
        """A socket (pooled, or new), the request sent, its first answer: safe to retry as a unit."""
        pooled = self._pool.take()
        if pooled is not None:
            try:
                return pooled, await self._send_first(pooled, body)
            except BaseException as err:
                # Closed under us (server idle timeout, network): went stale in the pool, so a
                # fresh socket, without counting a try. An error answer is the request's own.
                stale = pooled.closed or isinstance(err, (aiohttp.ClientError, ConnectionError))
                await pooled.close()
                if not stale:
                    raise
                log.debug("%s: a pooled connection was dead; opening a new one", NAME)
        ws = await wsclient.connect(self._http(), self.ws_url, self._headers(), NAME, self.settings.timeout_seconds)
        try:
            return ws, await self._send_first(ws, body)
        except (aiohttp.ClientError, ConnectionError) as err:
            await ws.close()
            raise Unavailable(f"{NAME}: the connection failed while sending the request: {err}") from None
        except BaseException:
            await ws.close()
            raise

    async def _send_first(self, ws: aiohttp.ClientWebSocketResponse, body: dict) -> dict:
        await ws.send_str(json.dumps(body))
        first = await self._next(ws, body["context_id"], "the first audio")
        if first.get("type") == "error":
            raise _error(first)  # the caller closes the socket: never reused in an unknown state
        return first

    async def _next(self, ws: aiohttp.ClientWebSocketResponse, context: str, what: str) -> dict:
        """The next message of `context`; messages of other (earlier) contexts are dropped."""
        while True:
            message = await wsclient.receive_json(ws, NAME, self.settings.timeout_seconds, what)
            if message.get("context_id") in (None, context):
                return message

    async def _cancel(self, ws: aiohttp.ClientWebSocketResponse, context: str) -> None:
        """Cancel the context (stops queued work), then close the socket (stops work under way)."""
        log.debug("%s: cancelling context %s", NAME, context)
        with contextlib.suppress(Exception):
            if not ws.closed:
                await asyncio.wait_for(ws.send_str(json.dumps({"context_id": context, "cancel": True})), 2.0)
        await ws.close()


def _error(message: dict) -> StreamError:
    status = message.get("status_code")
    return wsclient.classify(NAME, str(message.get("error") or message.get("message") or "error"),
                             status if isinstance(status, int) else None)
