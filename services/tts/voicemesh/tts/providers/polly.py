"""Amazon Polly through boto3 (`--provider polly`).

Mapping onto the TTS contract: one `SynthesizeSpeech` request per sentence, OutputFormat
`pcm` (PCM16 mono little-endian; Polly gives PCM at 8000 or 16000 Hz only, so
`sample_rate_hz` is the rate asked for and the servicer resamples to the caller's). boto3 is
blocking, so each request runs on a worker thread: the thread reads the `AudioStream` in
~100 ms chunks and hands each to the event loop as it arrives, so the first audio leaves
before Polly has finished the sentence. A speed other than 1.0 becomes SSML `<prosody rate>`.

Cancel (barge-in, hang-up) closes the `AudioStream`, dropping the HTTP connection, so Polly
stops sending. botocore retries (standard mode, `max_attempts`) cover opening the request
only: once audio has been read, a failure ends the call. Word marks (`word_marks`, off by
default) need a second request (OutputFormat json, SpeechMarkTypes word), billed like the
first, so they are opt-in; its marks are yielded as WordMarks as soon as they arrive.

Voices come from DescribeVoices for the engine (at load and at each health probe, cached);
the probe doubles as the credential and reachability check: it is free, signed, and fails on
bad keys. Credentials come from the standard AWS chain (env, shared files, container or
instance role); botocore's loggers are kept at WARNING or above so nothing signed is logged.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from voicemesh.runtime.errors import (
    DeadlineExceeded, InvalidInput, NotFound, PermissionDenied, ResourceExhausted, StreamError, Unauthenticated,
    Unavailable,
)
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.upstream import http_error
from voicemesh.tts.providers.base import SynthesisRequest, TtsProvider, WordMark

log = logging.getLogger(__name__)

WHAT = "polly"
PCM_RATES_HZ = (8000, 16000)  # the only PCM rates Polly produces
ENGINES = ("neural", "standard", "generative", "long-form")
AUTH_ERRORS = {"UnrecognizedClientException", "InvalidSignatureException", "IncompleteSignature",
               "MissingAuthenticationTokenException", "MissingAuthenticationToken", "ExpiredTokenException",
               "InvalidClientTokenId", "SignatureDoesNotMatch"}
THROTTLE_ERRORS = {"ThrottlingException", "Throttling", "TooManyRequestsException", "ServiceQuotaExceededException",
                   "LimitExceededException"}
INVALID_ERRORS = {"InvalidSampleRateException", "TextLengthExceededException", "InvalidSsmlException",
                  "SsmlMarksNotSupportedForTextTypeException", "MarksNotSupportedForFormatException",
                  "LanguageNotSupportedException", "EngineNotSupportedException", "ValidationException",
                  "InvalidParameterValue", "SerializationException"}
_END = object()


def _quiet_botocore() -> None:
    # botocore's DEBUG log shows signed headers and bodies; never let it, whatever --log-level says.
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(max(logging.getLogger(name).getEffectiveLevel(), logging.WARNING))


@dataclass
class PollySettings:
    region: str = field(default="", metadata={"help": "AWS region (default: from the AWS config chain, else us-east-1)"})
    endpoint: str = field(default="", metadata={
        "help": "Polly endpoint URL (default https://polly.<region>.amazonaws.com; e.g. a VPC endpoint)"})
    voice: str = field(default="Joanna", metadata={"help": "voice id when the caller asks for none, e.g. Joanna, Matthew"})
    engine: str = field(default="neural", metadata={"help": "neural, standard, generative or long-form"})
    sample_rate: int = field(default=16000, metadata={"help": "PCM rate asked of Polly: 16000 or 8000"})
    language: str = field(default="", metadata={"help": "LanguageCode for bilingual voices, e.g. en-IN (default: the voice's)"})
    word_marks: bool = field(default=False, metadata={
        "help": "also request word speech marks (a second request per sentence, billed like the first)"})
    profile: str = field(default="", metadata={"help": "AWS profile of the shared config files (default: AWS_PROFILE)"})
    max_attempts: int = field(default=3, metadata={"help": "attempts to open a request (botocore standard retries)"})
    connect_timeout_s: float = field(default=5.0, metadata={"help": "seconds to connect to Polly"})
    read_timeout_s: float = field(default=20.0, metadata={"help": "seconds Polly may go quiet before the call fails"})
    max_concurrent: int = field(default=32, metadata={"help": "syntheses at once (worker threads and HTTP connections)"})


def polly_error(err: Exception, voice: str = "") -> StreamError:
    """The StreamError for a botocore exception from Polly."""
    from botocore.exceptions import (
        ClientError, ConnectionClosedError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError,
    )

    if isinstance(err, StreamError):
        return err
    if isinstance(err, NoCredentialsError):
        return Unauthenticated(f"{WHAT}: no AWS credentials; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or a role")
    if isinstance(err, ReadTimeoutError):
        return DeadlineExceeded(f"{WHAT}: Polly did not answer in time ({err})")
    if isinstance(err, (EndpointConnectionError, ConnectionClosedError)):
        return Unavailable(f"{WHAT}: cannot reach Polly: {err}")
    if not isinstance(err, ClientError):
        return Unavailable(f"{WHAT}: the request failed: {type(err).__name__}: {err}")
    error = err.response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", "")
    status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    text = f"{WHAT}: {code}: {message}"
    if code in AUTH_ERRORS:
        return Unauthenticated(f"{text}; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile or role")
    if code == "AccessDeniedException":
        return PermissionDenied(f"{text}; allow polly:SynthesizeSpeech and polly:DescribeVoices for these credentials")
    if code in THROTTLE_ERRORS:
        return ResourceExhausted(f"{text}; Polly is throttling this account: retry later or raise the quota")
    if code == "LexiconNotFoundException" or (code == "ValidationException" and "voice" in message.lower()):
        return NotFound(f"{text}; voice {voice!r} does not exist in this region for this engine")
    if code == "EngineNotSupportedException":
        return InvalidInput(f"{text}; voice {voice!r} does not support this engine: choose another voice or engine")
    if code in INVALID_ERRORS:
        return InvalidInput(text)
    return http_error(WHAT, status or 500, f"{code}: {message}")


class _Synthesis:
    """Shared by one call's worker thread and the loop: the open body, and whether to stop."""

    def __init__(self) -> None:
        self.cancelled = False
        self.bodies: list = []

    def close(self) -> None:
        self.cancelled = True
        for body in self.bodies:
            # close() alone does not wake a thread blocked reading the socket (the connection would
            # stay open until read_timeout): urllib3's shutdown() does; the thread then closes it.
            with contextlib.suppress(Exception):
                body._raw_stream.shutdown()
            with contextlib.suppress(Exception):
                body.close()


class PollyTtsProvider(TtsProvider):
    """Amazon Polly; settings in PollySettings (env VOICEMESH_TTS_POLLY_<FIELD>)."""

    name = "polly"
    settings_class = PollySettings

    def __init__(self, settings: PollySettings | None = None):
        _quiet_botocore()
        import boto3
        from botocore.config import Config

        self.settings = settings or PollySettings()
        if self.settings.sample_rate not in PCM_RATES_HZ:
            raise SystemExit(f"{WHAT}: sample_rate must be 8000 or 16000 (Polly's PCM rates), got {self.settings.sample_rate}")
        if self.settings.engine not in ENGINES:
            raise SystemExit(f"{WHAT}: engine must be one of {', '.join(ENGINES)}, got {self.settings.engine!r}")
        self.sample_rate_hz = self.settings.sample_rate
        self._chunk_bytes = self.sample_rate_hz * 2 // 10  # 100 ms
        from botocore.exceptions import BotoCoreError

        try:
            self._session = boto3.session.Session(profile_name=self.settings.profile or None)
            # At startup, like every provider's credential: a missing one stops the process here.
            credentials = self._session.get_credentials()
        except BotoCoreError as err:  # e.g. the profile is not in the shared files
            raise SystemExit(f"{WHAT}: {err}") from None
        if credentials is None:
            raise SystemExit(f"{WHAT}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                             "AWS_PROFILE, or run with a container/instance role")
        # AWS_REGION too: the variable the other AWS SDKs (and Lambda, ECS) set; boto3 reads only its own.
        self.region = self.settings.region or os.environ.get("AWS_REGION") or self._session.region_name or "us-east-1"
        self._config = Config(retries={"total_max_attempts": max(self.settings.max_attempts, 1), "mode": "standard"},
                              connect_timeout=self.settings.connect_timeout_s, read_timeout=self.settings.read_timeout_s,
                              max_pool_connections=self.settings.max_concurrent)
        self._client = None
        self._executor = ThreadPoolExecutor(max_workers=self.settings.max_concurrent, thread_name_prefix="polly")
        self._voices: dict[str, set[str]] = {}  # voice id -> its language codes, for the engine

    # --- lifecycle -----------------------------------------------------------------------------
    async def load(self) -> None:
        def make_client():
            return self._session.client("polly", region_name=self.region, endpoint_url=self.settings.endpoint or None,
                                        config=self._config)

        self._client = await asyncio.to_thread(make_client)
        reason = await self.probe()  # voices now if Polly answers; the health probe reports it if not
        log.info("%s ready: region %s, voice %s (%s), %s", WHAT, self.region, self.settings.voice, self.settings.engine,
                 "reachable" if reason is None else f"not yet serving: {reason}")

    def info(self) -> ProviderInfo:
        details = {"voice": self.settings.voice, "engine": self.settings.engine, "region": self.region,
                   "endpoint": self.settings.endpoint or f"https://polly.{self.region}.amazonaws.com",
                   "output": f"pcm {self.sample_rate_hz} Hz", "word_marks": str(self.settings.word_marks).lower()}
        if self.settings.language:
            details["language"] = self.settings.language
        return ProviderInfo(provider=self.name, model=f"polly-{self.settings.engine}", sample_rates_hz=(self.sample_rate_hz,),
                            details=details)

    def voices(self) -> list[str]:
        return sorted(self._voices)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=False, cancel_futures=True)

    async def probe(self) -> str | None:
        try:
            # Not on the synthesis executor: when every worker is streaming audio, the probe must
            # not queue behind them and report a busy replica as unreachable.
            voices = await asyncio.to_thread(self._describe_voices)
        except Exception as err:  # noqa: BLE001 - any failure is the reason
            return polly_error(err).message
        self._voices = voices
        if self.settings.voice not in voices:
            return (f"{WHAT}: voice {self.settings.voice!r} does not exist for engine {self.settings.engine} in {self.region}; "
                    f"available: {', '.join(sorted(voices)) or 'none'}")
        return None

    def _describe_voices(self) -> dict[str, set[str]]:
        voices: dict[str, set[str]] = {}
        token = None
        while True:
            page = self._client.describe_voices(Engine=self.settings.engine, IncludeAdditionalLanguageCodes=True,
                                                **({"NextToken": token} if token else {}))
            for voice in page.get("Voices", []):
                voices[voice["Id"]] = {voice.get("LanguageCode", ""), *voice.get("AdditionalLanguageCodes", [])}
            if not (token := page.get("NextToken")):
                return voices

    # --- synthesis -----------------------------------------------------------------------------
    def _params(self, request: SynthesisRequest, voice: str) -> dict:
        params = {"Text": request.text, "VoiceId": voice, "Engine": self.settings.engine}
        if request.speed and abs(request.speed - 1.0) > 1e-3:
            params.update(Text=f'<speak><prosody rate="{round(request.speed * 100)}%">{escape(request.text)}</prosody></speak>',
                          TextType="ssml")
        language = request.language or self.settings.language
        known = self._voices.get(voice)
        if language and known is not None:
            if language in known:
                params["LanguageCode"] = language  # picks the variant of a bilingual voice
            elif not any(code.lower().startswith(language.lower() + "-") for code in known):
                raise InvalidInput(f"{WHAT}: voice {voice!r} speaks {', '.join(sorted(known))}, not {language!r}; "
                                   f"choose a voice for {language}")
        return params

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[bytes | WordMark]:
        voice = request.voice or self.settings.voice
        if self._voices and voice not in self._voices:
            raise NotFound(f"{WHAT}: voice {voice!r} does not exist for engine {self.settings.engine}; "
                           f"available: {', '.join(self.voices())}")
        if not request.text.strip():
            return
        params = self._params(request, voice)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        state = _Synthesis()

        def put(item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        audio = loop.run_in_executor(self._executor, self._stream_audio, params, state, put)
        marks = loop.run_in_executor(self._executor, self._word_marks, params, state) if self.settings.word_marks else None
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise polly_error(item, voice)
                if marks is not None and marks.done():
                    for mark in self._marks_of(marks):
                        yield mark
                    marks = None
                yield item
            if marks is not None:
                await asyncio.wait([marks])
                for mark in self._marks_of(marks):
                    yield mark
        finally:
            state.close()  # a no-op after the end; on cancel it drops the connection, so Polly stops
            for future in (audio, marks):
                if future is not None and not future.cancel() and not future.cancelled():
                    future.exception()  # done: its outcome was handled above or no longer matters

    def _stream_audio(self, params: dict, state: _Synthesis, put) -> None:
        """Worker thread: open the request (botocore retries this part), then pass on each chunk."""
        try:
            response = self._client.synthesize_speech(OutputFormat="pcm", SampleRate=str(self.sample_rate_hz), **params)
            body = response["AudioStream"]
            state.bodies.append(body)
            if state.cancelled:  # cancelled while the request was being opened
                body.close()
                return
            for chunk in body.iter_chunks(self._chunk_bytes):
                if state.cancelled:
                    break
                put(chunk)
            body.close()
            put(_END)
        except Exception as err:  # noqa: BLE001 - handed to the loop, mapped there
            put(_END if state.cancelled else err)

    def _word_marks(self, params: dict, state: _Synthesis) -> list[WordMark]:
        response = self._client.synthesize_speech(OutputFormat="json", SpeechMarkTypes=["word"], **params)
        body = response["AudioStream"]
        state.bodies.append(body)
        marks = []
        for line in body.read().decode("utf-8").splitlines():
            if line.strip() and (mark := json.loads(line)).get("type") == "word":
                marks.append(WordMark(text=mark.get("value", ""), start_ms=float(mark.get("time", 0))))
        return marks

    @staticmethod
    def _marks_of(future) -> list[WordMark]:
        if future.cancelled():
            return []
        if (err := future.exception()) is not None:  # marks are extra: the audio is still good
            log.warning("%s: word marks failed: %s", WHAT, polly_error(err).message)
            return []
        return future.result()
