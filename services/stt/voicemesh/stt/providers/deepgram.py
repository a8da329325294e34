"""Deepgram live-streaming STT over its documented WebSocket API (aiohttp; no Deepgram SDK).

How the API maps onto UpstreamRecognition (utterances.py gives the SttStream around it):
- open: one WebSocket `GET /v1/listen?model=..&language=..&encoding=linear16&sample_rate=16000..`
  per utterance, `Authorization: Token <key>`. A refused handshake is an HTTP status with the
  reason in the `dg-error` header (the JSON body `err_code`/`err_msg` is not exposed by
  WebSocket clients), mapped by `http_error` (401 key refused, 429 throttled, 400 bad model,
  language or encoding, 5xx unavailable); open_with_retry retries the transient ones.
- send: each chunk is one binary message (never an empty one: Deepgram treats that as the end).
  A KeepAlive text message goes out when nothing was sent for a few seconds, since Deepgram
  closes a silent connection after 10 s (NET-0001).
- end: `{"type":"Finalize"}` (flush now: the final comes at once, `from_finalize`), then
  `{"type":"CloseStream"}`; the server sends what is left and its Metadata, then closes.
  Deepgram's own endpointing is off: voicemesh's VAD and turn model decide when a turn ends.
- results: `Results` messages; `is_final` false are interims, true ones are the finals of the
  segments Deepgram cuts (utterances.py joins them into one final per finalize). Word times
  come in seconds from the first sample of the connection, which is what utterances.py wants.
- cancel: the socket is closed at once, without CloseStream: Deepgram stops transcribing (and
  billing) that stream.
- In-stream errors are WebSocket close codes: 1008 DATA-0000 (audio not decodable), 1011
  NET-0000/NET-0001 (timeouts); anything but a normal close after CloseStream is an error.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from voicemesh.runtime.errors import DeadlineExceeded, InvalidInput, StreamError, Unavailable
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.upstream import Secret, http_error, read_secret
from voicemesh.stt.providers.base import SttProvider, SttStream, SttStreamConfig, SttTranscript, Word
from voicemesh.stt.providers.utterances import UpstreamRecognition, UtteranceSttStream

log = logging.getLogger(__name__)
NAME = "deepgram"
KEY_ENV = ("DEEPGRAM_API_KEY",)
KEEPALIVE_S = 4.0  # Deepgram closes a connection that got nothing for 10 s; its docs advise 3-5 s
END_TIMEOUT_S = 30.0  # after CloseStream, the server must have answered and closed within this
PROBE_TIMEOUT_S = 5.0
_HEALTHY = ("Ready", "Healthy", "Degraded")  # self-hosted /v1/status states that can serve


@dataclass
class DeepgramSettings:
    endpoint: str = field(default="wss://api.deepgram.com", metadata={
        "help": "Deepgram API base: wss://api.deepgram.com, a regional one (wss://api.eu.deepgram.com) "
                "or a self-hosted one (ws://host:8080)"})
    model: str = field(default="nova-3", metadata={"help": "Deepgram model (nova-3, nova-2, nova-3-medical, ...)"})
    language: str = field(default="en-US", metadata={
        "help": "language when a stream names none (BCP-47, or multi for nova-3 code-switching)"})
    smart_format: bool = field(default=True, metadata={"help": "Deepgram smart formatting (numbers, dates, ...)"})
    punctuate: bool = field(default=True, metadata={"help": "punctuation and capitalisation"})
    keyterms: str = field(default="", metadata={"help": "comma-separated key terms to boost (nova-3 keyterm prompting)"})
    keywords: str = field(default="", metadata={"help": "comma-separated word:boost pairs (nova-2 and older models)"})
    extra_query: str = field(default="", metadata={
        "help": "more /v1/listen query parameters, as a query string (e.g. numerals=true&filler_words=true)"})
    self_hosted: bool = field(default=False, metadata={
        "help": "the endpoint is a self-hosted Deepgram: the API key is optional and the probe reads /v1/status"})
    api_key_file: str = field(default="", metadata={
        "help": "file holding the API key (a mounted secret); else env DEEPGRAM_API_KEY"})
    connect_timeout_seconds: float = field(default=10.0, metadata={"help": "seconds to connect and finish the handshake"})


def _bases(endpoint: str) -> tuple[str, str]:
    """(WebSocket base, HTTP base) of an endpoint given as ws(s)://, http(s):// or a bare host."""
    endpoint = endpoint.strip().rstrip("/")
    if "://" not in endpoint:
        endpoint = "wss://" + endpoint
    parts = urlsplit(endpoint)
    secure = parts.scheme in ("wss", "https")
    if parts.scheme not in ("ws", "wss", "http", "https"):
        raise SystemExit(f"{NAME}: endpoint {endpoint!r} must start with wss://, ws://, https:// or http://")
    ws = urlunsplit(("wss" if secure else "ws", parts.netloc, parts.path, "", ""))
    http = urlunsplit(("https" if secure else "http", parts.netloc, parts.path, "", ""))
    return ws, http


class DeepgramSttProvider(SttProvider):
    """Deepgram streaming STT: one WebSocket per utterance (see the module docstring)."""

    name = NAME
    settings_class = DeepgramSettings

    def __init__(self, settings: DeepgramSettings | None = None) -> None:
        self.settings = settings or DeepgramSettings()
        self._ws_base, self._http_base = _bases(self.settings.endpoint)
        self._key: Secret | None = read_secret(self.settings.api_key_file, KEY_ENV, NAME, required=not self.settings.self_hosted)
        self._session: aiohttp.ClientSession | None = None

    async def load(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=self.settings.connect_timeout_seconds,
                                        sock_connect=self.settings.connect_timeout_seconds)
        self._session = aiohttp.ClientSession(timeout=timeout)
        log.info("deepgram: %s, model %s, credentials from %s", self._ws_base, self.settings.model,
                 self._key.source if self._key else "nowhere (self-hosted)")

    def info(self) -> ProviderInfo:
        details = {"endpoint": self._ws_base, "language": self.settings.language, "formats": "linear16 16 kHz mono",
                   "smart_format": str(self.settings.smart_format).lower(), "self_hosted": str(self.settings.self_hosted).lower()}
        if self._key is not None:
            details["credentials"] = self._key.source  # where the key came from, never the key
        return ProviderInfo(provider=NAME, model=self.settings.model, sample_rates_hz=(16000,), details=details)

    def open_stream(self, config: SttStreamConfig) -> SttStream:
        return UtteranceSttStream(config, self._open, NAME)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # --- one utterance ---------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self._key.reveal()}"} if self._key else {}

    def _query(self, config: SttStreamConfig, language: str) -> list[tuple[str, str]]:
        s = self.settings
        query = [("model", s.model), ("language", language), ("encoding", "linear16"),
                 ("sample_rate", str(config.sample_rate_hz)), ("channels", "1"),
                 ("interim_results", str(config.interim_results).lower()), ("punctuate", str(s.punctuate).lower()),
                 ("smart_format", str(s.smart_format).lower()), ("endpointing", "false")]
        query += [("keyterm", term.strip()) for term in s.keyterms.split(",") if term.strip()]
        query += [("keywords", word.strip()) for word in s.keywords.split(",") if word.strip()]
        for pair in filter(None, s.extra_query.split("&")):
            name, _, value = pair.partition("=")
            query.append((name, value))
        return query

    async def _open(self, config: SttStreamConfig) -> UpstreamRecognition:
        assert self._session is not None, "load() first"
        language = config.language or self.settings.language
        url = f"{self._ws_base}/v1/listen"
        try:
            ws = await asyncio.wait_for(self._session.ws_connect(  # the handshake too, not just TCP
                url, params=self._query(config, language), headers=self._headers(), autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0)), self.settings.connect_timeout_seconds)
        except aiohttp.WSServerHandshakeError as err:
            reason = (err.headers or {}).get("dg-error", "") if err.headers is not None else ""
            raise self._handshake_error(err.status, reason or err.message, language) from None
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as err:
            raise Unavailable(f"{NAME}: cannot connect to {self._ws_base}: {err or type(err).__name__}; "
                              "check the endpoint setting and the network") from None
        return _DeepgramRecognition(ws, language)

    def _handshake_error(self, status: int, reason: str, language: str) -> StreamError:
        hints = {
            401: "check DEEPGRAM_API_KEY (or the api_key_file) holds a valid Deepgram API key",
            402: "the Deepgram project is out of credit",
            403: f"the API key may not use model {self.settings.model!r}",
            429: "too many concurrent requests for this Deepgram project; retry later or raise its limit",
            400: f"check model {self.settings.model!r} and language {language!r} (Deepgram's models & languages)",
        }
        hint = hints.get(status, "")
        if status == 402:
            status = 403  # Payment Required: the caller can act on it like a permission refusal
        return http_error(NAME, status, reason, hint)

    # --- health ----------------------------------------------------------------------------
    async def probe(self) -> str | None:
        """Hosted: GET /v1/projects (checks the key, bills nothing). Self-hosted: GET /v1/status."""
        if self._session is None:
            return f"{NAME}: not loaded"
        path = "/v1/status" if self.settings.self_hosted else "/v1/projects"
        try:
            async with self._session.get(self._http_base + path, headers=self._headers(),
                                         timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as response:
                if response.status in (401, 403):
                    return f"{NAME}: the API key was refused (HTTP {response.status}); check DEEPGRAM_API_KEY"
                if response.status != 200:
                    return f"{NAME}: {self._http_base}{path} answered HTTP {response.status}"
                if self.settings.self_hosted:
                    health = (await response.json(content_type=None)).get("system_health", "")
                    if health not in _HEALTHY:
                        return f"{NAME}: the self-hosted node reports {health or 'no health'}"
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
            return f"{NAME}: cannot reach {self._http_base}: {err or type(err).__name__}"
        return None


class _DeepgramRecognition(UpstreamRecognition):
    """One /v1/listen WebSocket: one utterance."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, language: str) -> None:
        self._ws = ws
        self._language = language
        self._ended = False  # CloseStream sent: a normal close from now on is the end
        self._timed_out = False
        self._last_sent = time.monotonic()
        self._keepalive = asyncio.create_task(self._keep_alive())
        self._watchdog: asyncio.Task | None = None

    async def send(self, pcm16: bytes) -> None:
        if not pcm16:  # an empty binary message would end the stream
            return
        if self._ws.closed:
            raise Unavailable(f"{NAME}: the connection closed while audio was being sent")
        self._last_sent = time.monotonic()
        await self._ws.send_bytes(pcm16)

    async def end(self) -> None:
        if self._ws.closed:
            return  # results() says why
        self._ended = True
        self._keepalive.cancel()
        await self._ws.send_str(json.dumps({"type": "Finalize"}))
        await self._ws.send_str(json.dumps({"type": "CloseStream"}))
        self._watchdog = asyncio.create_task(self._close_after(END_TIMEOUT_S))

    async def results(self) -> AsyncIterator[SttTranscript]:
        reason = ""
        try:
            while True:
                message = await self._ws.receive()
                if message.type == aiohttp.WSMsgType.TEXT:
                    transcript = self._transcript(json.loads(message.data))
                    if transcript is not None:
                        yield transcript
                elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    reason = message.extra if message.type == aiohttp.WSMsgType.CLOSE and message.extra else ""
                    break
                elif message.type == aiohttp.WSMsgType.ERROR:
                    raise Unavailable(f"{NAME}: the connection failed: {self._ws.exception()}")
            self._raise_for_close(str(reason))
        finally:
            self._keepalive.cancel()
            if self._watchdog is not None:
                self._watchdog.cancel()

    async def cancel(self) -> None:
        self._keepalive.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self._ws.close()  # no CloseStream: Deepgram drops the stream and what it had not sent

    # --- inside ----------------------------------------------------------------------------
    async def _keep_alive(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not self._ws.closed:
                idle = time.monotonic() - self._last_sent
                if idle >= KEEPALIVE_S:
                    self._last_sent = time.monotonic()
                    await self._ws.send_str(json.dumps({"type": "KeepAlive"}))
                    idle = 0.0
                await asyncio.sleep(KEEPALIVE_S - idle)

    async def _close_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._timed_out = True
        await self._ws.close()

    def _raise_for_close(self, reason: str) -> None:
        code = self._ws.close_code
        if self._timed_out:
            raise DeadlineExceeded(f"{NAME}: no end of the transcript {END_TIMEOUT_S:.0f} s after the audio ended")
        if code == 1000 and self._ended:
            return
        detail = f"close code {code}" + (f" {reason}" if reason else "")
        if code == 1008 or "DATA-" in reason:
            raise InvalidInput(f"{NAME}: the audio could not be decoded ({detail}); voicemesh sends linear16 16 kHz mono")
        if code == 1011 or "NET-" in reason:
            raise Unavailable(f"{NAME}: the stream timed out on Deepgram's side ({detail})")
        raise Unavailable(f"{NAME}: the stream closed before the transcript ended ({detail})")

    def _transcript(self, message: dict) -> SttTranscript | None:
        kind = message.get("type")
        if kind == "Error":  # documented for some failures as a text message before the close
            raise Unavailable(f"{NAME}: {message.get('description') or message.get('message') or message}")
        if kind != "Results":
            return None  # Metadata, SpeechStarted, UtteranceEnd: nothing for the caller
        alternatives = (message.get("channel") or {}).get("alternatives") or [{}]
        best = alternatives[0]
        start_s = float(message.get("start") or 0.0)
        words = tuple(
            Word(w.get("punctuated_word") or w.get("word", ""), round(float(w.get("start", 0)) * 1000),
                 round(float(w.get("end", 0)) * 1000), float(w.get("confidence") or 0.0))
            for w in best.get("words") or ())
        return SttTranscript(
            text=best.get("transcript") or "", is_final=bool(message.get("is_final")),
            confidence=float(best.get("confidence") or 0.0), language=self._language,
            start_ms=round(start_s * 1000), end_ms=round((start_s + float(message.get("duration") or 0.0)) * 1000),
            words=words)
