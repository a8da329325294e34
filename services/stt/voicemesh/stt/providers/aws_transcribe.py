"""Amazon Transcribe streaming over its documented WebSocket API (`--provider aws`).

No AWS SDK for Transcribe streaming fits here (the official one needs Python >= 3.12, the old
`amazon-transcribe` is unmaintained and HTTP/2-only), so this speaks the WebSocket API itself:
botocore signs the upgrade URL (SigV4 query auth, service "transcribe", valid 300 s) with
credentials from the standard AWS chain, aiohttp opens it, and each message either way is one
AWS event-stream message (encoded by `aws_eventstream`, decoded by botocore's
EventStreamBuffer).

Mapping onto the STT contract (through `UtteranceSttStream`): one WebSocket per utterance,
opened at turn start. Audio goes out as `AudioEvent`s of 50-100 ms (the size AWS asks for;
bigger sends are split, smaller ones wait for the next); finalize sends the empty AudioEvent
that ends the audio, and Transcribe answers with its last finals and closes the socket.
`TranscriptEvent` results map onto transcripts: `IsPartial` -> interim, `Alternatives[0]`
-> text, its `Items` -> words (times in seconds from the first sample sent, confidence;
punctuation items are appended to the word before them). Cancel closes the socket, which
ends the request (AWS bills the audio streamed, so barge-in stops the meter).

The health probe never opens a transcription: AWS bills each streaming request for at least
15 s, so a handshake every probe could cost money. It checks the credentials with STS
GetCallerIdentity (free, needs no IAM permission) and that the streaming endpoint accepts a
connection (TCP, plus TLS for wss), without sending a request there.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode, urlsplit

from voicemesh.runtime.errors import (
    InvalidInput, NotFound, PermissionDenied, ResourceExhausted, StreamError, Unauthenticated, Unavailable,
)
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.upstream import http_error
from voicemesh.stt.providers import aws_eventstream
from voicemesh.stt.providers.base import SttProvider, SttStream, SttStreamConfig, SttTranscript, Word
from voicemesh.stt.providers.utterances import UpstreamRecognition, UtteranceSttStream

log = logging.getLogger(__name__)

WHAT = "aws transcribe"
RATE_HZ = 16000  # the servicer hands every provider PCM16 mono at 16 kHz
MIN_CHUNK_BYTES = RATE_HZ * 2 * 50 // 1000  # 50 ms: AWS asks for 50-200 ms per AudioEvent
CHUNK_BYTES = RATE_HZ * 2 * 100 // 1000  # 100 ms
PRESIGN_EXPIRES_S = 300
AUTH_ERRORS = {"UnrecognizedClientException", "InvalidSignatureException", "SignatureDoesNotMatch",
               "IncompleteSignature", "MissingAuthenticationToken", "InvalidClientTokenId", "ExpiredTokenException",
               "ExpiredToken", "AuthFailure"}
THROTTLE_ERRORS = {"LimitExceededException", "ThrottlingException", "TooManyRequestsException", "Throttling"}
UNAVAILABLE_ERRORS = {"InternalFailureException", "ServiceUnavailableException", "ConflictException"}


def _quiet_botocore() -> None:
    # botocore's DEBUG log shows signed URLs and headers; never let it, whatever --log-level says.
    for name in ("botocore", "boto3", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.getLogger(name).getEffectiveLevel(), logging.WARNING))


@dataclass
class TranscribeSettings:
    region: str = field(default="", metadata={"help": "AWS region (default: from the AWS config chain, else us-east-1)"})
    endpoint: str = field(default="", metadata={
        "help": "streaming endpoint, ws:// or wss:// (default wss://transcribestreaming.<region>.amazonaws.com:8443)"})
    language: str = field(default="en-US", metadata={"help": "language code when the caller gives none, e.g. en-US"})
    vocabulary: str = field(default="", metadata={"help": "name of a custom vocabulary in this account and region"})
    profile: str = field(default="", metadata={"help": "AWS profile of the shared config files (default: AWS_PROFILE)"})
    connect_timeout_s: float = field(default=10.0, metadata={"help": "seconds to open the WebSocket"})
    probe_credentials: bool = field(default=True, metadata={
        "help": "health probe checks the credentials with STS GetCallerIdentity (free); off where STS is unreachable"})
    sts_endpoint: str = field(default="", metadata={"help": "STS endpoint for the probe (default: the regional one)"})


def exception_error(kind: str, message: str, language: str) -> StreamError:
    """The StreamError for an exception Transcribe sends (in the stream or as a handshake type)."""
    text = f"{WHAT}: {kind}: {message or 'no message'}"
    lowered = message.lower()
    if kind in AUTH_ERRORS:
        return Unauthenticated(f"{text}; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile or role")
    if kind == "AccessDeniedException":
        return PermissionDenied(f"{text}; allow transcribe:StartStreamTranscriptionWebSocket for these credentials")
    if kind in THROTTLE_ERRORS:
        return ResourceExhausted(f"{text}; too many concurrent streams: retry later or raise the quota")
    if kind in UNAVAILABLE_ERRORS:
        return Unavailable(text)
    if "vocabulary" in lowered and ("not found" in lowered or "couldn't be found" in lowered or "doesn't exist" in lowered):
        return NotFound(f"{text}; create the vocabulary in this region or unset the vocabulary setting")
    if "language" in lowered:
        return InvalidInput(f"{text}; language {language!r} is not supported for streaming")
    return InvalidInput(text)


def _handshake_error(status: int, headers, language: str) -> StreamError:
    kind = (headers or {}).get("x-amzn-ErrorType", "").split(":")[0]
    message = (headers or {}).get("x-amzn-ErrorMessage", "")
    if kind:
        error = exception_error(kind, message, language)
        if not isinstance(error, InvalidInput) or 400 <= status < 500:
            return error
    return http_error(WHAT, status, f"{kind or 'WebSocket handshake refused'} {message}".strip(),
                      "check the AWS credentials, their transcribe:StartStreamTranscriptionWebSocket permission, "
                      "the region and the endpoint")


def _words(items: list[dict]) -> tuple[tuple[Word, ...], float]:
    words: list[Word] = []
    confidences = []
    for item in items:
        content = item.get("Content", "")
        if item.get("Type") == "punctuation":
            if words:
                last = words[-1]
                words[-1] = Word(last.text + content, last.start_ms, last.end_ms, last.confidence)
            continue
        confidence = float(item.get("Confidence") or 0.0)
        if confidence:
            confidences.append(confidence)
        words.append(Word(content, round(float(item.get("StartTime", 0)) * 1000), round(float(item.get("EndTime", 0)) * 1000),
                          confidence))
    return tuple(words), sum(confidences) / len(confidences) if confidences else 0.0


def transcripts(payload: bytes, language: str) -> list[SttTranscript]:
    """The transcripts of one TranscriptEvent."""
    out = []
    for result in json.loads(payload or b"{}").get("Transcript", {}).get("Results", []):
        alternatives = result.get("Alternatives") or [{}]
        words, confidence = _words(alternatives[0].get("Items") or [])
        out.append(SttTranscript(
            text=alternatives[0].get("Transcript", ""), is_final=not result.get("IsPartial", False),
            confidence=confidence, language=result.get("LanguageCode") or language,
            start_ms=round(float(result.get("StartTime", 0)) * 1000), end_ms=round(float(result.get("EndTime", 0)) * 1000),
            words=words,
        ))
    return out


class TranscribeRecognition(UpstreamRecognition):
    """One utterance: one WebSocket to Transcribe."""

    def __init__(self, ws, language: str):
        self._ws = ws
        self._language = language
        self._buffer = bytearray()
        self._ended = False

    async def _send_event(self, pcm: bytes) -> None:
        try:
            await self._ws.send_bytes(aws_eventstream.event("AudioEvent", pcm))
        except ConnectionError:
            pass  # the socket is closing: results() reports why

    async def send(self, pcm16: bytes) -> None:
        self._buffer += pcm16
        while len(self._buffer) >= MIN_CHUNK_BYTES:
            chunk = bytes(self._buffer[:CHUNK_BYTES])
            del self._buffer[:CHUNK_BYTES]
            await self._send_event(chunk)

    async def end(self) -> None:
        if self._buffer:
            await self._send_event(bytes(self._buffer))
            self._buffer.clear()
        self._ended = True
        await self._send_event(b"")  # the empty AudioEvent: no more audio

    async def results(self) -> AsyncIterator[SttTranscript]:
        from aiohttp import WSMsgType
        from botocore.eventstream import EventStreamBuffer

        decoder = EventStreamBuffer()
        async for message in self._ws:
            if message.type != WSMsgType.BINARY:
                continue
            decoder.add_data(message.data)
            for event in decoder:
                headers = event.headers
                if headers.get(":message-type") == "exception":
                    detail = json.loads(event.payload or b"{}")
                    raise exception_error(headers.get(":exception-type", "exception"),
                                          detail.get("Message") or detail.get("message") or "", self._language)
                if headers.get(":message-type") == "event" and headers.get(":event-type") == "TranscriptEvent":
                    for transcript in transcripts(event.payload, self._language):
                        yield transcript
        if not self._ended:
            raise Unavailable(f"{WHAT}: the stream closed before the audio ended (close code {self._ws.close_code})")

    async def cancel(self) -> None:
        await self._ws.close()


class TranscribeSttProvider(SttProvider):
    """Amazon Transcribe streaming; settings in TranscribeSettings (env VOICEMESH_STT_AWS_<FIELD>)."""

    name = "aws"
    settings_class = TranscribeSettings

    def __init__(self, settings: TranscribeSettings | None = None):
        _quiet_botocore()
        import botocore.session
        from botocore.exceptions import BotoCoreError

        self.settings = settings or TranscribeSettings()
        try:
            self._session = botocore.session.Session(profile=self.settings.profile or None)
            # AWS_REGION too: the variable the other AWS SDKs (and Lambda, ECS) set; botocore reads only its own.
            self.region = (self.settings.region or os.environ.get("AWS_REGION") or self._session.get_config_variable("region")
                           or "us-east-1")
            # At startup, like every provider's credential: a missing one stops the process here.
            self._credentials = self._session.get_credentials()
        except BotoCoreError as err:  # e.g. the profile is not in the shared files
            raise SystemExit(f"{WHAT}: {err}") from None
        if self._credentials is None:
            raise SystemExit(f"{WHAT}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                             "AWS_PROFILE, or run with a container/instance role")
        endpoint = self.settings.endpoint or f"wss://transcribestreaming.{self.region}.amazonaws.com:8443"
        parts = urlsplit(endpoint)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise SystemExit(f"{WHAT}: endpoint must be ws://host:port or wss://host:port, got {endpoint!r}")
        self.endpoint = endpoint.rstrip("/")
        self._http = None  # aiohttp.ClientSession, made on the loop in load()
        self._sts = None

    async def load(self) -> None:
        import aiohttp

        self._http = aiohttp.ClientSession()
        log.info("%s ready: region %s, endpoint %s, credentials from %s", WHAT, self.region, self.endpoint,
                 getattr(self._credentials, "method", "the AWS chain"))

    def info(self) -> ProviderInfo:
        details = {"region": self.region, "endpoint": self.endpoint, "language": self.settings.language,
                   "encoding": "pcm", "api": "websocket"}
        if self.settings.vocabulary:
            details["vocabulary"] = self.settings.vocabulary
        return ProviderInfo(provider=self.name, model="amazon-transcribe-streaming", sample_rates_hz=(RATE_HZ,),
                            details=details)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    def open_stream(self, config: SttStreamConfig) -> SttStream:
        return UtteranceSttStream(config, self._open, "aws")

    # --- one request ---------------------------------------------------------------------
    def language_for(self, config: SttStreamConfig) -> str:
        language = config.language or self.settings.language
        if "-" not in language and self.settings.language.lower().startswith(language.lower() + "-"):
            return self.settings.language  # "en" -> the configured "en-US": Transcribe needs the region
        return language

    async def presigned_url(self, language: str) -> str:
        from botocore.auth import SigV4QueryAuth
        from botocore.awsrequest import AWSRequest

        credentials = await asyncio.to_thread(self._credentials.get_frozen_credentials)  # refreshes a role's keys
        query = {"language-code": language, "media-encoding": "pcm", "sample-rate": str(RATE_HZ)}
        if self.settings.vocabulary:
            query["vocabulary-name"] = self.settings.vocabulary
        parts = urlsplit(self.endpoint)
        scheme = "https" if parts.scheme == "wss" else "http"  # same host and port: what is signed
        request = AWSRequest(method="GET", url=f"{scheme}://{parts.netloc}/stream-transcription-websocket?"
                                               f"{urlencode(query, quote_via=quote)}")
        SigV4QueryAuth(credentials, "transcribe", self.region, expires=PRESIGN_EXPIRES_S).add_auth(request)
        return parts.scheme + request.url[len(scheme):]

    async def _open(self, config: SttStreamConfig) -> TranscribeRecognition:
        import aiohttp
        import yarl

        language = self.language_for(config)
        url = await self.presigned_url(language)
        try:
            ws = await asyncio.wait_for(
                self._http.ws_connect(yarl.URL(url, encoded=True), autoping=True, max_msg_size=16 << 20,
                                      timeout=aiohttp.ClientWSTimeout(ws_close=5.0)),
                self.settings.connect_timeout_s)
        except aiohttp.WSServerHandshakeError as err:
            raise _handshake_error(err.status, err.headers, language) from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as err:
            raise Unavailable(f"{WHAT}: cannot reach {self.endpoint}: {err or type(err).__name__}") from None
        return TranscribeRecognition(ws, language)

    # --- health ------------------------------------------------------------------------------
    async def probe(self) -> str | None:
        parts = urlsplit(self.endpoint)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, port, ssl=parts.scheme == "wss"), self.settings.connect_timeout_s)
            writer.close()
        except (OSError, asyncio.TimeoutError) as err:
            return f"{WHAT}: cannot connect to {self.endpoint}: {err or type(err).__name__}"
        if self.settings.probe_credentials:
            return await asyncio.to_thread(self._check_credentials)
        return None

    def _check_credentials(self) -> str | None:
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        if self._sts is None:
            self._sts = self._session.create_client(
                "sts", region_name=self.region, endpoint_url=self.settings.sts_endpoint or None,
                config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=5))
        try:
            self._sts.get_caller_identity()
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            return f"{WHAT}: STS refused the credentials ({code}: {err.response.get('Error', {}).get('Message', '')})"
        except BotoCoreError as err:
            return f"{WHAT}: cannot check the credentials with STS: {err}"
        return None
