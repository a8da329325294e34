"""Azure AI Speech STT through Microsoft's Speech SDK (azure-cognitiveservices-speech).

The SDK is under Microsoft's proprietary licence terms: it is the `azure` extra only, and only
this module (and the TTS one) imports it.

How the SDK maps onto UpstreamRecognition (utterances.py gives the SttStream around it):
- open: per utterance a `SpeechRecognizer` on a `PushAudioInputStream` (PCM16 mono 16 kHz)
  with `start_continuous_recognition_async`. The SDK opens the service's websocket (USP),
  sends the audio as it is pushed and retries a failed connection itself (a few tries within
  ~1 s), so voicemesh adds no retry of its own: a failure arrives as a `canceled` event.
- send: `push_stream.write`; end: `push_stream.close()`, which makes the SDK send the end of
  the audio: the service answers its last phrase at once and the session stops.
- results: `recognizing` events are interims, `recognized` ones finals (the detailed output
  format with word-level timestamps: NBest[0] Words, Offset/Duration in 100 ns ticks from the
  first sample sent, Confidence). NoMatch results are dropped.
- cancel: `stop_continuous_recognition_async` (the SDK sends the end of the audio at once, so
  nothing more is streamed or billed; it waits for the service at most STOP_TIMEOUT_S), then
  the recognizer is released, which closes its websocket.
- errors: `CancellationDetails` (error code and text) -> StreamError (`error_for`).
- SDK callbacks run on SDK threads: each one hops to the event loop (call_soon_threadsafe).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import azure.cognitiveservices.speech as speechsdk

from voicemesh.runtime.errors import (
    DeadlineExceeded, InvalidInput, NotFound, PermissionDenied, ResourceExhausted, StreamError, Unauthenticated,
    Unavailable,
)
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.upstream import Secret, read_secret
from voicemesh.stt.providers.base import SttProvider, SttStream, SttStreamConfig, SttTranscript, Word
from voicemesh.stt.providers.utterances import UpstreamRecognition, UtteranceSttStream

log = logging.getLogger(__name__)
NAME = "azure"
KEY_ENV = ("AZURE_SPEECH_KEY", "SPEECH_KEY")
RATE_HZ = 16000
TICKS_PER_MS = 10_000  # the service's times are in 100 ns ticks
STOP_TIMEOUT_S = 1  # how long a cancel lets the SDK wait for the service's last answer (SDK default: 10 s)
PROBE_TIMEOUT_S = 5.0
_CODE = speechsdk.CancellationErrorCode


@dataclass
class AzureSttSettings:
    region: str = field(default="eastus", metadata={"help": "Azure region of the Speech resource (eastus, westeurope, ...)"})
    endpoint: str = field(default="", metadata={
        "help": "host override instead of the region: a Speech container (ws://host:5000) or a private endpoint "
                "(wss://NAME.cognitiveservices.azure.com); a URL with a path is used as the full endpoint"})
    language: str = field(default="en-US", metadata={"help": "recognition language when a stream names none (BCP-47)"})
    endpoint_id: str = field(default="", metadata={"help": "Custom Speech model deployment (endpoint id); empty: the base model"})
    api_key_file: str = field(default="", metadata={
        "help": "file holding the Speech resource key (a mounted secret); else env AZURE_SPEECH_KEY or SPEECH_KEY"})
    probe: str = field(default="token", metadata={
        "help": "health probe: token (POST /sts/v1.0/issueToken: checks the key, bills nothing), "
                "ready (GET /ready, for containers) or none"})


def http_base(settings) -> str:
    """Where the probe goes: the regional token endpoint, or the endpoint override over HTTP."""
    if not settings.endpoint:
        return f"https://{settings.region}.api.cognitive.microsoft.com"
    parts = urlsplit(settings.endpoint if "://" in settings.endpoint else "wss://" + settings.endpoint)
    return f"{'https' if parts.scheme in ('wss', 'https') else 'http'}://{parts.netloc}"


def speech_config(settings, key: Secret | None) -> speechsdk.SpeechConfig:
    """The SpeechConfig for the region or the endpoint override (host, or a full URL with a path)."""
    subscription = key.reveal() if key else None
    if not settings.endpoint:
        return speechsdk.SpeechConfig(subscription=subscription, region=settings.region)
    endpoint = settings.endpoint if "://" in settings.endpoint else "wss://" + settings.endpoint
    if urlsplit(endpoint).path.strip("/"):
        return speechsdk.SpeechConfig(subscription=subscription, endpoint=endpoint)
    return speechsdk.SpeechConfig(subscription=subscription, host=endpoint.rstrip("/"))


async def probe_endpoint(settings, key: Secret | None) -> str | None:
    """None if the service answers and takes the key; else why not."""
    if settings.probe == "none":
        return None
    base = http_base(settings)
    if settings.probe == "ready":
        method, url, headers = "GET", f"{base}/ready", {}
    else:
        method, url = "POST", f"{base}/sts/v1.0/issueToken"
        headers = {"Ocp-Apim-Subscription-Key": key.reveal() if key else "", "Content-Length": "0"}
    try:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.request(method, url, headers=headers) as response:
            if response.status in (401, 403):
                return f"{NAME}: the key was refused (HTTP {response.status}); check AZURE_SPEECH_KEY and the region"
            if response.status >= 300:
                return f"{NAME}: {url} answered HTTP {response.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        return f"{NAME}: cannot reach {base}: {err or type(err).__name__}"
    return None


def error_for(code, details: str, what: str = "") -> StreamError:
    """The StreamError for a cancellation (error code + the SDK's text). The SDK turns HTTP
    statuses of the handshake and websocket close codes into codes, but several answers share
    one (403 is an AuthenticationFailure, 404 a ServiceError, quota a BadRequest), so the text
    refines it."""
    text = re.sub(r"\s*SessionId: \w+", "", details or "").strip()
    text = re.sub(r"\s+", " ", text)[:300]
    message = f"{NAME}: {text or code}"
    lowered = text.lower()
    if code == _CODE.Forbidden or (code == _CODE.AuthenticationFailure and "(403)" in text):
        return PermissionDenied(f"{message}; the key may not use this resource or feature")
    if code == _CODE.AuthenticationFailure:
        return Unauthenticated(f"{message}; check AZURE_SPEECH_KEY (or the api_key_file) and the region")
    if code == _CODE.TooManyRequests or "quota" in lowered or "throttl" in lowered or "4429" in text:
        return ResourceExhausted(f"{message}; too many requests for this Speech resource, retry later")
    if "(404)" in text:
        return NotFound(f"{message}; check the endpoint and endpoint_id (a Custom Speech deployment) exist")
    if code == _CODE.BadRequest:
        about_language = what and ("locale" in lowered or "language" in lowered)
        return InvalidInput(f"{message}; {what}" if about_language else message)
    if code == _CODE.ServiceTimeout:
        return DeadlineExceeded(message)
    return Unavailable(message)


def release(held: list) -> None:
    """Drop SDK objects: their handlers (which hold the loop and queue), then the objects, here,
    in a worker thread, since the native destructors may block (a recognizer's closes its
    connection). The caller keeps no reference: `held` is emptied."""
    while held:
        obj = held.pop()
        for name in ("recognizing", "recognized", "canceled", "session_stopped", "synthesizing", "synthesis_completed",
                     "synthesis_canceled", "synthesis_word_boundary"):
            signal = getattr(obj, name, None)
            if signal is not None:
                signal.disconnect_all()
        del obj


class AzureSttProvider(SttProvider):
    """Azure AI Speech STT: one SDK recognizer per utterance (see the module docstring)."""

    name = NAME
    settings_class = AzureSttSettings

    def __init__(self, settings: AzureSttSettings | None = None) -> None:
        self.settings = settings or AzureSttSettings()
        # A container needs no key (it bills through its own); the public service always does.
        self._key = read_secret(self.settings.api_key_file, KEY_ENV, NAME, required=not self.settings.endpoint)
        self._config: speechsdk.SpeechConfig | None = None

    async def load(self) -> None:
        config = speech_config(self.settings, self._key)
        config.output_format = speechsdk.OutputFormat.Detailed
        config.request_word_level_timestamps()
        if self.settings.endpoint_id:
            config.endpoint_id = self.settings.endpoint_id
        config.set_property_by_name("SPEECH-StopRecognitionTimeoutInSeconds", str(STOP_TIMEOUT_S))
        self._config = config
        log.info("azure stt: %s, language %s, credentials from %s", self._where(), self.settings.language,
                 self._key.source if self._key else "nowhere (container)")

    def _where(self) -> str:
        return self.settings.endpoint or f"region {self.settings.region}"

    def info(self) -> ProviderInfo:
        details = {"region": self.settings.region, "endpoint": self.settings.endpoint or http_base(self.settings),
                   "language": self.settings.language, "formats": "pcm16 16 kHz mono",
                   "sdk": f"azure-cognitiveservices-speech {speechsdk.__version__}"}
        if self._key is not None:
            details["credentials"] = self._key.source  # where the key came from, never the key
        return ProviderInfo(provider=NAME, model=self.settings.endpoint_id or "azure-speech", sample_rates_hz=(RATE_HZ,),
                            details=details)

    async def probe(self) -> str | None:
        return await probe_endpoint(self.settings, self._key)

    def open_stream(self, config: SttStreamConfig) -> SttStream:
        return UtteranceSttStream(config, self._open, NAME)

    async def _open(self, config: SttStreamConfig) -> UpstreamRecognition:
        assert self._config is not None, "load() first"
        recognition = _AzureRecognition(self._config, config.language or self.settings.language)
        try:
            await recognition.start()
        except RuntimeError as err:  # the SDK refused to start (its message says why)
            await recognition.cancel()
            raise Unavailable(f"{NAME}: cannot start recognition: {str(err).splitlines()[-1][:200]}") from None
        except BaseException:  # cancelled while starting (barge-in, hang-up): stop it, or it runs on, billed
            await asyncio.shield(recognition.cancel())
            raise
        return recognition


class _AzureRecognition(UpstreamRecognition):
    """One SpeechRecognizer: one utterance."""

    def __init__(self, config: speechsdk.SpeechConfig, language: str) -> None:
        self._config = config
        self._language = language
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._stream: speechsdk.audio.PushAudioInputStream | None = None
        self._recognizer: speechsdk.SpeechRecognizer | None = None
        self._ended = False
        self._released = False

    def _hop(self, name: str):
        loop, events = self._loop, self._events

        def handler(event) -> None:  # on an SDK thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (name, event))
            except RuntimeError:  # the loop has closed: nobody is listening
                pass

        return handler

    async def start(self) -> None:
        def start() -> None:  # native construction and start: off the event loop
            fmt = speechsdk.audio.AudioStreamFormat(samples_per_second=RATE_HZ, bits_per_sample=16, channels=1)
            stream = speechsdk.audio.PushAudioInputStream(stream_format=fmt)
            recognizer = speechsdk.SpeechRecognizer(speech_config=self._config, language=self._language,
                                                    audio_config=speechsdk.audio.AudioConfig(stream=stream))
            for name in ("recognizing", "recognized", "canceled", "session_stopped"):
                getattr(recognizer, name).connect(self._hop(name))
            self._stream, self._recognizer = stream, recognizer
            recognizer.start_continuous_recognition_async().get()

        await asyncio.to_thread(start)

    async def send(self, pcm16: bytes) -> None:
        if pcm16 and not self._ended and self._stream is not None:
            self._stream.write(pcm16)  # copies into the SDK's buffer; never blocks on the network

    async def end(self) -> None:
        if not self._ended and self._stream is not None:
            self._ended = True
            self._stream.close()

    async def results(self) -> AsyncIterator[SttTranscript]:
        while True:
            name, event = await self._events.get()
            if name == "session_stopped":
                await self._release()
                return
            if name == "canceled":
                details = event.cancellation_details
                if details.reason == speechsdk.CancellationReason.Error:
                    await self._release()
                    raise error_for(details.code, details.error_details,
                                    f"check language {self._language!r} (Azure's speech-to-text languages)")
                continue  # EndOfStream: the session_stopped that follows ends the results
            transcript = self._transcript(event.result, final=name == "recognized")
            if transcript is not None:
                yield transcript

    async def cancel(self) -> None:
        if self._released:
            return
        self._ended = True

        def stop(recognizer: speechsdk.SpeechRecognizer | None) -> None:
            try:
                if recognizer is not None:
                    recognizer.stop_continuous_recognition_async().get()
            except RuntimeError as err:  # already stopped or failed: release anyway
                log.debug("azure stt: stop: %s", err)

        await asyncio.to_thread(stop, self._recognizer)
        await self._release()

    async def _release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._stream is not None:
            self._stream.close()
        # The last references go in the worker thread: the SDK's destructors may block.
        held = [self._recognizer, self._stream]
        self._recognizer = self._stream = None
        await asyncio.to_thread(release, held)

    def _transcript(self, result, final: bool) -> SttTranscript | None:
        if final and result.reason != speechsdk.ResultReason.RecognizedSpeech:
            return None  # NoMatch: silence or noise
        start_ms = result.offset // TICKS_PER_MS
        end_ms = (result.offset + result.duration) // TICKS_PER_MS
        if not final:
            return SttTranscript(text=result.text, is_final=False, language=self._language, start_ms=start_ms, end_ms=end_ms)
        try:
            best = (json.loads(result.json or "{}").get("NBest") or [{}])[0]
        except ValueError:
            best = {}
        words = tuple(
            Word(w.get("Word", ""), int(w.get("Offset", 0)) // TICKS_PER_MS,
                 (int(w.get("Offset", 0)) + int(w.get("Duration", 0))) // TICKS_PER_MS, float(w.get("Confidence") or 0.0))
            for w in best.get("Words") or ())
        return SttTranscript(text=result.text, is_final=True, confidence=float(best.get("Confidence") or 0.0),
                             language=self._language, start_ms=start_ms, end_ms=end_ms, words=words)
