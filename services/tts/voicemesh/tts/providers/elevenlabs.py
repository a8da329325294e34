"""ElevenLabs TTS over its documented WebSocket API (`/v1/text-to-speech/{voice}/stream-input`),
with aiohttp as the client: no vendor SDK, so nothing but aiohttp (Apache-2.0) is installed.

How the API maps onto `TtsProvider.synthesize` (one call = one sentence):
- One WebSocket per call, on the single-context endpoint. The multi-context endpoint
  (`multi-stream-input`) would let calls share a socket, but its voice is fixed per socket as
  well, and a shared socket can only be cancelled context by context; here cancel is simply
  closing the socket, which the docs and the server treat as the end of generation (and of
  billing). The cost is one handshake per sentence (one round trip with TLS resumption).
- Messages: `{"text": " ", "voice_settings"?}` (the documented opening), then the sentence with
  `"flush": true` (generate now, whatever the chunk schedule says), then `{"text": ""}` (end of
  input). The server answers `{"audio": base64 PCM, "alignment": {...}}` messages as it
  generates, then `{"isFinal": true}`. Each chunk's audio is yielded as it arrives.
- Word marks: `alignment` (the original text; `normalizedAlignment` as a fallback) gives chars
  and their start times *relative to that chunk*, so a word's start is the audio already
  received plus its first char's time; words are split on whitespace.
- Format: `output_format=pcm_<rate>` (PCM16 little-endian mono); `sample_rate_hz` follows the
  setting. `ulaw_8000` is not used: the servicer converts PCM to mu-law itself, at any rate.
- Errors: a refused handshake by HTTP status (401 key, 403 permission, 404 voice/model, 429
  concurrency/quota, 5xx), an in-stream `{"message", "error", "code"}` or a 1008 close by its
  words (wsclient.classify). Opening (handshake and first answer) is retried on transient
  failures; once audio has gone out a failure is final.
- Health: `probe()` GETs the configured voice (`/v1/voices/{id}`): that checks the key and that
  the voice exists. A 403 there means the key is valid but scoped without voices_read; that
  key can still speak, so it counts as reachable. The voice list (`/v1/voices`) is read at
  load (and by the probe until it succeeds) so the servicer can reject unknown voices early.
"""
from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

import aiohttp

from voicemesh.runtime.errors import InvalidInput, PermissionDenied, StreamError, Unavailable
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.upstream import Secret, open_with_retry, read_secret
from voicemesh.tts.providers import wsclient
from voicemesh.tts.providers.base import SynthesisRequest, TtsProvider, WordMark

log = logging.getLogger(__name__)

NAME = "elevenlabs"
KEY_ENV = ("ELEVENLABS_API_KEY", "XI_API_KEY")
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100)  # the pcm_<rate> output formats
MIN_SPEED, MAX_SPEED = 0.7, 1.2  # voice_settings.speed, as documented
PROBE_CALL_S = 4.0  # per REST call of a probe: two fit in the runtime's 10 s probe deadline


@dataclass
class ElevenLabsSettings:
    endpoint: str = field(default="https://api.elevenlabs.io", metadata={
        "help": "API base URL (WebSocket and REST); regional: https://api.us.elevenlabs.io, "
                "https://api.eu.residency.elevenlabs.io, https://api.in.residency.elevenlabs.io; http://host:port for a proxy"})
    voice: str = field(default="JBFqnCBsd6RMkjVDRZzb", metadata={"help": "default voice id (a call may name another)"})
    model: str = field(default="eleven_flash_v2_5", metadata={"help": "model id (eleven_flash_v2_5, eleven_turbo_v2_5, ...)"})
    sample_rate_hz: int = field(default=24000, metadata={
        "help": "PCM rate asked of ElevenLabs: 8000, 16000, 22050, 24000 or 44100"})
    language: str = field(default="", metadata={
        "help": "language enforced (ISO 639-1, e.g. de) when a call names none; empty: the model detects it"})
    api_key_file: str = field(default="", metadata={"help": "file holding the API key (else ELEVENLABS_API_KEY)"})
    timeout_seconds: float = field(default=10.0, metadata={
        "help": "deadline to connect, for the first audio and between messages; also bounds the probe"})


def language_code(language: str) -> str:
    """ElevenLabs takes ISO 639-1 ("en"); callers send BCP-47 ("en-US")."""
    return language.split("-")[0].split("_")[0].lower() if language else ""


class _Words:
    """Words from per-chunk character alignment: a word starts at its first non-space char."""

    def __init__(self) -> None:
        self.chars: list[str] = []
        self.start_ms = 0.0

    def feed(self, alignment: dict, offset_ms: float) -> list[WordMark]:
        marks = []
        for char, start in zip(alignment.get("chars") or [], alignment.get("charStartTimesMs") or [], strict=False):
            if char.isspace():
                marks.extend(self.flush())
            else:
                if not self.chars:
                    self.start_ms = offset_ms + float(start)
                self.chars.append(char)
        return marks

    def flush(self) -> list[WordMark]:
        if not self.chars:
            return []
        word, self.chars = "".join(self.chars), []
        return [WordMark(word, self.start_ms)]


class ElevenLabsTtsProvider(TtsProvider):
    """ElevenLabs streaming TTS (see the module docstring for how the API maps)."""

    name = NAME
    settings_class = ElevenLabsSettings

    def __init__(self, settings: ElevenLabsSettings):
        self.settings = settings
        if settings.sample_rate_hz not in SAMPLE_RATES:
            raise SystemExit(f"{NAME}: sample_rate_hz {settings.sample_rate_hz} is not one of "
                             f"{', '.join(map(str, SAMPLE_RATES))} (the pcm_<rate> output formats)")
        self.sample_rate_hz = settings.sample_rate_hz
        self.key: Secret = read_secret(settings.api_key_file, KEY_ENV, NAME)
        self.rest = settings.endpoint.rstrip("/")
        self.ws = wsclient.ws_base(self.rest)
        self._session: aiohttp.ClientSession | None = None
        self._voices: list[str] | None = None  # None: not listed yet

    # -- lifecycle ------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"xi-api-key": self.key.reveal()}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:  # created on the serving loop, at first use
            self._session = aiohttp.ClientSession()
        return self._session

    async def load(self) -> None:
        # Never fatal: bad credentials or an outage at start-up show as NOT_SERVING (probe),
        # and the process serves once they are fixed, without a restart.
        try:
            await self._list_voices()
        except StreamError as err:
            log.warning("%s: voice list not read at start-up: %s", NAME, err.message)

    async def _list_voices(self, timeout_s: float = 0.0) -> None:
        data = await wsclient.get_json(self._http(), f"{self.rest}/v1/voices", self._headers(), NAME,
                                       timeout_s or self.settings.timeout_seconds)
        items = data.get("voices", []) if isinstance(data, dict) else []
        voices = [v.get("voice_id", "") for v in items if isinstance(v, dict)]
        self._voices = [v for v in voices if v]
        log.info("%s: %d voices available", NAME, len(self._voices))

    async def probe(self) -> str | None:
        try:
            if self._voices is None:
                try:
                    await self._list_voices(PROBE_CALL_S)
                except PermissionDenied:
                    self._voices = []  # a scoped key without voices_read: no list, every voice allowed
            url = f"{self.rest}/v1/voices/{quote(self.settings.voice, safe='')}"
            await wsclient.get_json(self._http(), url, self._headers(), NAME, PROBE_CALL_S)
        except PermissionDenied:
            return None  # authenticated; the key may speak without being allowed to read voices
        except StreamError as err:
            return err.message
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def info(self) -> ProviderInfo:
        return ProviderInfo(
            provider=NAME, model=self.settings.model, sample_rates_hz=(self.sample_rate_hz,),
            details={"voice": self.settings.voice, "endpoint": self.rest, "output_format": f"pcm_{self.sample_rate_hz}",
                     "language": self.settings.language or "auto", "credentials": self.key.source},
        )

    def voices(self) -> list[str]:
        if not self._voices:
            return []  # unknown (not listed, or a scoped key): the provider itself judges the voice
        return sorted(set(self._voices) | {self.settings.voice})

    # -- synthesis ------------------------------------------------------------------------

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[bytes | WordMark]:
        text = request.text.strip()
        if not text:
            return
        speed = request.speed or 1.0
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise InvalidInput(f"{NAME}: speed {speed:g} is outside {MIN_SPEED}-{MAX_SPEED}, the range ElevenLabs supports")
        voice = request.voice or self.settings.voice
        query = {"model_id": self.settings.model, "output_format": f"pcm_{self.sample_rate_hz}"}
        if language := language_code(request.language or self.settings.language):
            query["language_code"] = language
        url = f"{self.ws}/v1/text-to-speech/{quote(voice, safe='')}/stream-input?{urlencode(query)}"
        opening: dict = {"text": " "}
        if speed != 1.0:
            opening["voice_settings"] = {"speed": speed}
        messages = (opening, {"text": text + " ", "flush": True}, {"text": ""})

        ws, first = await open_with_retry(lambda: self._open(url, messages), f"{NAME}: open a synthesis")
        words = _Words()
        received = 0  # audio bytes so far: where the next chunk's alignment times start
        carry = b""  # an odd trailing byte, joined to the next chunk (whole samples only)
        done = False
        try:
            message = first
            while True:
                _raise_if_error(message)
                if audio := message.get("audio"):
                    pcm = carry + base64.b64decode(audio)
                    offset_ms = received * 1000 / (2 * self.sample_rate_hz)
                    cut = len(pcm) - len(pcm) % 2
                    carry = pcm[cut:]
                    if cut:
                        received += cut
                        yield pcm[:cut]
                    alignment = message.get("alignment") or message.get("normalizedAlignment")
                    if alignment:
                        for mark in words.feed(alignment, offset_ms):
                            yield mark
                if message.get("isFinal"):
                    done = True
                    break
                message = await wsclient.receive_json(ws, NAME, self.settings.timeout_seconds, "the end of the audio")
            for mark in words.flush():
                yield mark
        finally:
            if not done:
                log.debug("%s: closing an unfinished synthesis (cancelled or failed)", NAME)
            await ws.close()  # the server stops generating when the socket goes

    async def _open(self, url: str, messages: tuple[dict, ...]) -> tuple[aiohttp.ClientWebSocketResponse, dict]:
        """Handshake, send the whole request, wait for the first answer: safe to retry as a unit."""
        ws = await wsclient.connect(self._http(), url, self._headers(), NAME, self.settings.timeout_seconds)
        try:
            for message in messages:
                await ws.send_str(json.dumps(message))
            first = await wsclient.receive_json(ws, NAME, self.settings.timeout_seconds, "the first audio")
            _raise_if_error(first)
            return ws, first
        except (aiohttp.ClientError, ConnectionError) as err:
            await ws.close()
            raise Unavailable(f"{NAME}: the connection failed while sending the text: {err}") from None
        except BaseException:
            await ws.close()
            raise


def _raise_if_error(message: dict) -> None:
    """An in-stream error: {"message", "error", "code"} (code 1008 for policy/auth/quota errors)."""
    if "error" in message and message.get("audio") is None and not message.get("isFinal"):
        error = message.get("error")
        words = " ".join(str(part) for part in (error, message.get("message")) if part)
        raise wsclient.classify(NAME, words or json.dumps(message)[:200])
