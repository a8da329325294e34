"""Azure AI Speech TTS through Microsoft's Speech SDK (azure-cognitiveservices-speech).

The SDK is under Microsoft's proprietary licence terms: it is the `azure` extra only, and only
this module (and the STT one) imports it.

How the SDK maps onto TtsProvider.synthesize:
- one call = one `speak_ssml_async` on a `SpeechSynthesizer` with no audio device
  (audio_config=None) and a raw PCM16 mono output format at `sample_rate_hz` (8/16/22.05/24/
  44.1/48 kHz), so nothing is decoded here. The SSML names the voice, language and rate.
- audio: the `synthesizing` event gives each chunk as the service sends it (so the first
  audio goes out long before the synthesis ends); `synthesis_word_boundary` (word boundaries
  only, offsets in 100 ns ticks) becomes WordMark; `synthesis_completed` / `_canceled` end it.
- synthesizers are pooled: each keeps its websocket open between calls (one call at a time
  each), so a sentence does not pay for a connection; concurrent calls take more of them.
- cancel (the caller closed the generator: barge-in): `stop_speaking_async`, which closes that
  synthesizer's websocket, so the service stops synthesizing (and billing); that synthesizer
  is then released rather than pooled, so no late event of the cancelled call can reach a new one.
- errors: the cancellation details (error code + text) -> StreamError, as for STT.
- SDK callbacks run on SDK threads: each one hops to the event loop (call_soon_threadsafe).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

import aiohttp
import azure.cognitiveservices.speech as speechsdk

from voicemesh.runtime.errors import DeadlineExceeded, InvalidInput, NotFound, PermissionDenied, ResourceExhausted
from voicemesh.runtime.errors import StreamError, Unauthenticated, Unavailable
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.upstream import Secret, read_secret
from voicemesh.tts.providers.base import SynthesisRequest, TtsProvider, WordMark

log = logging.getLogger(__name__)
NAME = "azure"
KEY_ENV = ("AZURE_SPEECH_KEY", "SPEECH_KEY")
TICKS_PER_MS = 10_000
PROBE_TIMEOUT_S = 5.0
MAX_IDLE = 4  # pooled synthesizers (open connections) kept between calls
_F = speechsdk.SpeechSynthesisOutputFormat
FORMATS = {8000: _F.Raw8Khz16BitMonoPcm, 16000: _F.Raw16Khz16BitMonoPcm, 22050: _F.Raw22050Hz16BitMonoPcm,
           24000: _F.Raw24Khz16BitMonoPcm, 44100: _F.Raw44100Hz16BitMonoPcm, 48000: _F.Raw48Khz16BitMonoPcm}
_CODE = speechsdk.CancellationErrorCode
_SIGNALS = ("synthesizing", "synthesis_word_boundary", "synthesis_completed", "synthesis_canceled")


@dataclass
class AzureTtsSettings:
    region: str = field(default="eastus", metadata={"help": "Azure region of the Speech resource (eastus, westeurope, ...)"})
    endpoint: str = field(default="", metadata={
        "help": "host override instead of the region: a Speech container (ws://host:5000) or a private endpoint "
                "(wss://NAME.cognitiveservices.azure.com); a URL with a path is used as the full endpoint"})
    voice: str = field(default="en-US-AvaMultilingualNeural", metadata={"help": "default voice (a ShortName of the voice list)"})
    sample_rate_hz: int = field(default=24000, metadata={
        "help": "output rate asked of Azure (raw PCM16 mono): 8000, 16000, 22050, 24000, 44100 or 48000"})
    voices: str = field(default="", metadata={
        "help": "comma-separated voices callers may ask for; empty: Azure's voice list (fetched at start), else the default"})
    api_key_file: str = field(default="", metadata={
        "help": "file holding the Speech resource key (a mounted secret); else env AZURE_SPEECH_KEY or SPEECH_KEY"})
    probe: str = field(default="token", metadata={
        "help": "health probe: token (POST /sts/v1.0/issueToken: checks the key, bills nothing), "
                "ready (GET /ready, for containers) or none"})


def _urls(settings) -> tuple[str, str]:
    """(HTTP base for REST calls, the voice list URL)."""
    if not settings.endpoint:
        return (f"https://{settings.region}.api.cognitive.microsoft.com",
                f"https://{settings.region}.tts.speech.microsoft.com/cognitiveservices/voices/list")
    scheme, _, rest = (settings.endpoint if "://" in settings.endpoint else "wss://" + settings.endpoint).partition("://")
    base = f"{'https' if scheme in ('wss', 'https') else 'http'}://{rest.split('/')[0]}"
    return base, base + "/cognitiveservices/voices/list"


def _speech_config(settings, key: Secret | None) -> speechsdk.SpeechConfig:
    subscription = key.reveal() if key else None
    if not settings.endpoint:
        return speechsdk.SpeechConfig(subscription=subscription, region=settings.region)
    endpoint = settings.endpoint if "://" in settings.endpoint else "wss://" + settings.endpoint
    if "/" in endpoint.partition("://")[2].strip("/"):
        return speechsdk.SpeechConfig(subscription=subscription, endpoint=endpoint)
    return speechsdk.SpeechConfig(subscription=subscription, host=endpoint.rstrip("/"))


def error_for(code, details: str, voice: str) -> StreamError:
    """The StreamError for a cancellation: the SDK's error code, refined by its text (403 is an
    AuthenticationFailure, quota and unknown voices are BadRequests, a 404 a ServiceError)."""
    text = re.sub(r"\s+", " ", re.sub(r"\s*(SessionId|USP state|Received audio size):.*", "", details or "")).strip()[:300]
    message = f"{NAME}: {text or code}"
    lowered = text.lower()
    if code == _CODE.Forbidden or (code == _CODE.AuthenticationFailure and "(403)" in text):
        return PermissionDenied(f"{message}; the key may not use this resource or voice")
    if code == _CODE.AuthenticationFailure:
        return Unauthenticated(f"{message}; check AZURE_SPEECH_KEY (or the api_key_file) and the region")
    if code == _CODE.TooManyRequests or "quota" in lowered or "throttl" in lowered:
        return ResourceExhausted(f"{message}; too many requests for this Speech resource, retry later")
    if "unsupported voice" in lowered or "(404)" in text:
        return NotFound(f"{message}; voice {voice!r} does not exist for this resource (see its voice list)")
    if code == _CODE.BadRequest:
        return InvalidInput(message)
    if code == _CODE.ServiceTimeout:
        return DeadlineExceeded(message)
    return Unavailable(message)


class _Synthesizer:
    """A pooled SpeechSynthesizer; its events go to whichever call uses it now (`sink`)."""

    def __init__(self, config: speechsdk.SpeechConfig) -> None:
        self.synthesizer = speechsdk.SpeechSynthesizer(speech_config=config, audio_config=None)
        self.sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        for name in _SIGNALS:
            getattr(self.synthesizer, name).connect(self._hop(name))

    def _hop(self, name: str):
        def handler(event) -> None:  # on an SDK thread
            sink = self.sink
            if sink is None:
                return
            if name == "synthesizing":
                item = bytes(event.result.audio_data)
            elif name == "synthesis_word_boundary":
                if event.boundary_type != speechsdk.SpeechSynthesisBoundaryType.Word:
                    return
                item = WordMark(event.text, event.audio_offset / TICKS_PER_MS)
            else:
                item = event.result
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                sink[0].call_soon_threadsafe(sink[1].put_nowait, item)
        return handler


def _release(held: list) -> None:
    """Drop pooled synthesizers in a worker thread (the native destructor may block)."""
    while held:
        slot = held.pop()
        slot.sink = None
        for name in _SIGNALS:
            getattr(slot.synthesizer, name).disconnect_all()
        del slot


class AzureTtsProvider(TtsProvider):
    """Azure AI Speech TTS over pooled SDK synthesizers (see the module docstring)."""

    name = NAME
    settings_class = AzureTtsSettings

    def __init__(self, settings: AzureTtsSettings | None = None) -> None:
        self.settings = settings or AzureTtsSettings()
        if self.settings.sample_rate_hz not in FORMATS:
            raise SystemExit(f"{NAME}: sample_rate_hz must be one of {', '.join(map(str, FORMATS))} "
                             f"(Azure's raw PCM formats), got {self.settings.sample_rate_hz}")
        self.sample_rate_hz = self.settings.sample_rate_hz
        self._key = read_secret(self.settings.api_key_file, KEY_ENV, NAME, required=not self.settings.endpoint)
        self._config: speechsdk.SpeechConfig | None = None
        self._idle: list[_Synthesizer] = []
        self._voices = [v.strip() for v in self.settings.voices.split(",") if v.strip()]

    async def load(self) -> None:
        config = _speech_config(self.settings, self._key)
        config.set_speech_synthesis_output_format(FORMATS[self.sample_rate_hz])
        config.speech_synthesis_voice_name = self.settings.voice
        self._config = config
        self._idle.append(await asyncio.to_thread(self._warm, config))
        if not self._voices:
            self._voices = await self._voice_list() or [self.settings.voice]
        if self.settings.voice not in self._voices:
            log.warning("azure tts: the default voice %s is not in the voice list", self.settings.voice)
        log.info("azure tts: %s, voice %s, %d Hz, %d voices, credentials from %s",
                 self.settings.endpoint or f"region {self.settings.region}", self.settings.voice, self.sample_rate_hz,
                 len(self._voices), self._key.source if self._key else "nowhere (container)")

    @staticmethod
    def _warm(config: speechsdk.SpeechConfig) -> _Synthesizer:
        """A first pooled synthesizer with its connection opened now, so the first sentence does
        not pay for the handshake (a failure here only means the first call connects itself)."""
        slot = _Synthesizer(config)
        try:
            speechsdk.Connection.from_speech_synthesizer(slot.synthesizer).open(True)
        except RuntimeError as err:
            log.warning("azure tts: cannot open a connection ahead of time: %s", err)
        return slot

    async def _voice_list(self) -> list[str]:
        """Azure's voices for this resource (a free REST call); [] if it cannot be read."""
        url = _urls(self.settings)[1]
        headers = {"Ocp-Apim-Subscription-Key": self._key.reveal()} if self._key else {}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as session, \
                    session.get(url, headers=headers) as response:
                if response.status == 200:
                    return [v["ShortName"] for v in await response.json(content_type=None) if v.get("ShortName")]
                log.warning("azure tts: the voice list answered HTTP %d; only the default voice is offered", response.status)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, TypeError, KeyError) as err:
            log.warning("azure tts: cannot read the voice list (%s); only the default voice is offered", err)
        return []

    def info(self) -> ProviderInfo:
        details = {"voice": self.settings.voice, "region": self.settings.region,
                   "endpoint": self.settings.endpoint or _urls(self.settings)[0],
                   "formats": f"pcm16 {self.sample_rate_hz} Hz mono",
                   "sdk": f"azure-cognitiveservices-speech {speechsdk.__version__}"}
        if self._key is not None:
            details["credentials"] = self._key.source  # where the key came from, never the key
        return ProviderInfo(provider=NAME, model=self.settings.voice, sample_rates_hz=(self.sample_rate_hz,), details=details)

    def voices(self) -> list[str]:
        return list(self._voices)

    async def probe(self) -> str | None:
        if self.settings.probe == "none":
            return None
        base = _urls(self.settings)[0]
        if self.settings.probe == "ready":
            method, url, headers = "GET", f"{base}/ready", {}
        else:
            method, url = "POST", f"{base}/sts/v1.0/issueToken"
            headers = {"Ocp-Apim-Subscription-Key": self._key.reveal() if self._key else "", "Content-Length": "0"}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as session, \
                    session.request(method, url, headers=headers) as response:
                if response.status in (401, 403):
                    return f"{NAME}: the key was refused (HTTP {response.status}); check AZURE_SPEECH_KEY and the region"
                if response.status >= 300:
                    return f"{NAME}: {url} answered HTTP {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            return f"{NAME}: cannot reach {base}: {err or type(err).__name__}"
        return None

    async def close(self) -> None:
        held, self._idle = self._idle, []
        await asyncio.to_thread(_release, held)

    # --- synthesis -----------------------------------------------------------------------
    def _ssml(self, request: SynthesisRequest, voice: str) -> str:
        language = request.language or "-".join(voice.split("-")[:2]) or "en-US"
        text = escape(request.text)
        if request.speed and abs(request.speed - 1.0) > 1e-3:
            text = f"<prosody rate={quoteattr(f'{request.speed:.2f}')}>{text}</prosody>"
        return (f"<speak version='1.0' xmlns='http://www.w3.org/2001/10/synthesis' xml:lang={quoteattr(language)}>"
                f"<voice name={quoteattr(voice)}>{text}</voice></speak>")

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[bytes | WordMark]:
        assert self._config is not None, "load() first"
        if not request.text.strip():
            return
        voice = request.voice or self.settings.voice
        slot = self._idle.pop() if self._idle else await asyncio.to_thread(_Synthesizer, self._config)
        queue: asyncio.Queue = asyncio.Queue()
        slot.sink = (asyncio.get_running_loop(), queue)
        done = False
        try:
            slot.synthesizer.speak_ssml_async(self._ssml(request, voice))  # runs on the SDK's threads
            while True:
                item = await queue.get()
                if isinstance(item, (bytes, WordMark)):
                    if item:
                        yield item
                    continue
                done = True
                if item.reason == speechsdk.ResultReason.Canceled:
                    details = item.cancellation_details
                    raise error_for(details.error_code, details.error_details, voice)
                return
        finally:
            slot.sink = None
            if done and len(self._idle) < MAX_IDLE:
                self._idle.append(slot)
            else:
                await asyncio.shield(self._discard(slot, stop=not done))

    @staticmethod
    async def _discard(slot: _Synthesizer, stop: bool) -> None:
        held = [slot]
        del slot  # the last reference goes in the worker thread (the native destructor may block)

        def run() -> None:
            if stop:  # closes the websocket: the service stops this synthesis
                try:
                    held[0].synthesizer.stop_speaking_async().get()
                except RuntimeError as err:
                    log.debug("azure tts: stop: %s", err)
            _release(held)

        await asyncio.to_thread(run)
