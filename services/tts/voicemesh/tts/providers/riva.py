"""NVIDIA Riva speech synthesis (on-prem Riva, or NVIDIA-hosted NVCF) over Riva's gRPC API.

How the interface maps onto Riva:
- One `SynthesizeOnline` call per sentence (the servicer splits the text): a single
  `SynthesizeSpeechRequest` (text, language, LINEAR_PCM, `sample_rate_hz`, voice), then the
  request stream is half-closed. The call is client-streaming in the 2.26 stubs and
  unary-request on older servers; one request is wire-compatible with both, so it is called
  as unary-request (same method path, same messages): the request leaves with the call. A
  separate grpc.aio `write()` that fails because Riva already refused the call (bad key,
  throttled) would replace Riva's status with "INTERNAL: Internal error from Core". Riva
  streams the audio as it is vocoded: each chunk is handed on as it arrives, so the first
  audio leaves before the sentence is done. Riva reports no word boundaries (no WordMarks).
- `sample_rate_hz` (default 22050, the native rate of Riva's FastPitch/HiFi-GAN and Magpie
  voices; 16000 and 44100 work too, Riva resamples) is what is asked of Riva and what the
  provider reports, and the servicer resamples from it to what the caller wants (8-48 kHz,
  PCM16 or mu-law).
- Cancel: closing the generator (barge-in, a caller gone) cancels the call, which stops Riva
  synthesising (and NVCF billing) the rest of the sentence.
- Speed: Riva takes SSML, so a speed other than 1.0 wraps the text in `<prosody rate="N%">`.
- Voices: `GetRivaSynthesisConfig` (the probe: free, checks the key on NVCF) lists each model's
  `voice_name` and `subvoices`; a voice is `<voice_name>.<subvoice>` ("English-US.Female-1",
  "Magpie-Multilingual.EN-US.Aria"). Until a probe succeeds only the configured voice is known.
- The stubs are the riva client's own (`riva.client.proto.riva_tts_pb2_grpc`) through grpc.aio;
  `riva.client.proto.health_pb2` is never imported (it clashes with grpc.health.v1).
- NVCF (grpc.nvcf.nvidia.com:443) needs TLS, `authorization: Bearer <NVIDIA_API_KEY>` and the
  `function-id` of the deployed voice model as call metadata; a self-hosted Riva is host:50051.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import grpc
from riva.client.proto import riva_audio_pb2, riva_tts_pb2, riva_tts_pb2_grpc  # never health_pb2 (see above)

from voicemesh.runtime.errors import (
    DeadlineExceeded, FailedPrecondition, InvalidInput, NotFound, PermissionDenied, ResourceExhausted, StreamError,
    Unauthenticated, Unavailable,
)
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.upstream import open_with_retry, read_secret
from voicemesh.tts.providers.base import SynthesisRequest, TtsProvider

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
KEY_ENV = ("NVIDIA_API_KEY",)


@dataclass
class RivaTtsSettings:
    endpoint: str = field(default="localhost:50051", metadata={
        "help": "Riva gRPC host:port: a self-hosted Riva is host:50051 (plain); NVIDIA-hosted is grpc.nvcf.nvidia.com:443 "
                "with --use-tls and --function-id"})
    use_tls: bool = field(default=False, metadata={"help": "connect with TLS (required for NVCF)"})
    ssl_root_cert: str = field(default="", metadata={"help": "PEM file of the CA that signed a self-hosted Riva's TLS "
                                                             "certificate (default: the system roots)"})
    voice: str = field(default="", metadata={"help": "default voice, <voice_name>.<subvoice> as Riva lists it, e.g. "
                                                     "English-US.Female-1 (default: the server's first voice for the language)"})
    language: str = field(default="en-US", metadata={"help": "default language when the caller sends none (e.g. en-US)"})
    sample_rate_hz: int = field(default=22050, metadata={
        "help": "rate asked of Riva: 22050 is its voices' native rate; 16000 or 44100 also work (the service resamples "
                "to what each caller asks)"})
    function_id: str = field(default="", metadata={"help": "NVCF function id of the hosted TTS model (sent as "
                                                           "function-id metadata); empty for a self-hosted Riva"})
    api_key_file: str = field(default="", metadata={"help": "file holding the NVIDIA API key (a mounted secret); "
                                                            "else env NVIDIA_API_KEY; required with --function-id"})


# --- the same few helpers as voicemesh/stt/providers/riva.py (separate distributions) -------
def open_channel(endpoint: str, use_tls: bool, root_cert: str) -> grpc.aio.Channel:
    # Reconnect within seconds once Riva is back (gRPC's default backoff grows to two minutes).
    options = [("grpc.max_receive_message_length", 16 << 20), ("grpc.initial_reconnect_backoff_ms", 500),
               ("grpc.max_reconnect_backoff_ms", 5000)]
    if not use_tls:
        return grpc.aio.insecure_channel(endpoint, options=options)
    pem = Path(root_cert).read_bytes() if root_cert else None
    return grpc.aio.secure_channel(endpoint, grpc.ssl_channel_credentials(root_certificates=pem), options=options)


def call_metadata(key, function_id: str) -> tuple[tuple[str, str], ...]:
    metadata = []
    if key:
        metadata.append(("authorization", f"Bearer {key.reveal()}"))
    if function_id:
        metadata.append(("function-id", function_id))
    return tuple(metadata)


def riva_error(err: grpc.aio.AioRpcError, what: str, missing: str = "", named: bool = True) -> StreamError:
    """The StreamError for a Riva status; see the STT provider's (a voice Riva lacks is
    INVALID_ARGUMENT '... not available ...': NOT_FOUND when a voice was named)."""
    code = err.code()
    detail = (err.details() or "").strip()[:300] or code.name
    message = f"riva: {what}: {detail} (gRPC {code.name})"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(message + "; check the API key (NVIDIA_API_KEY or --api-key-file)")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(message + "; the key has no access to this function or model")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(message + "; throttled or out of capacity, retry later")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(message + "; check --function-id and --voice")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        lowered = detail.lower()
        if missing and ("unavailable model" in lowered or "not available" in lowered or "not found" in lowered):
            return (NotFound if named else InvalidInput)(f"{message}; {missing}")
        return InvalidInput(message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return FailedPrecondition(message + "; is the endpoint a Riva server with this service enabled?")
    return Unavailable(message)


def resolve_language(asked: str, default: str, served: list[str]) -> str:
    """`asked` or the default; a bare 'en' becomes the served 'en-*' (the default's if it is one)."""
    language = asked or default
    if not served or language in served:
        return language
    matches = [code for code in served if code.lower().split("-")[0] == language.lower()]
    if matches:
        return default if default in matches else matches[0]
    return language


def listed_voices(response) -> dict[str, list[str]]:
    """voice -> its languages, from a RivaSynthesisConfigResponse (as Riva's talk.py lists them)."""
    voices: dict[str, list[str]] = {}
    for config in response.model_config:
        voice_name = config.parameters.get("voice_name", "")
        languages = [code.strip() for code in config.parameters.get("language_code", "").split(",") if code.strip()]
        subvoices = [sub.split(":")[0].strip() for sub in config.parameters.get("subvoices", "").split(",")]
        for subvoice in subvoices:
            name = f"{voice_name}.{subvoice}" if voice_name and subvoice else voice_name or subvoice
            if name:
                voices.setdefault(name, []).extend(code for code in languages if code not in voices.get(name, []))
    return voices


class RivaTtsProvider(TtsProvider):
    name = "riva"
    settings_class = RivaTtsSettings

    def __init__(self, settings: RivaTtsSettings):
        if not 8000 <= settings.sample_rate_hz <= 48000:
            raise SystemExit(f"riva: sample_rate_hz must be 8000-48000 (22050 is Riva's native rate), got "
                             f"{settings.sample_rate_hz}")
        self.settings = settings
        self.sample_rate_hz = settings.sample_rate_hz
        self._key = read_secret(settings.api_key_file, KEY_ENV, "riva", required=bool(settings.function_id))
        self._metadata = call_metadata(self._key, settings.function_id)
        self._channel: grpc.aio.Channel | None = None
        self._stub = None
        self._voices: dict[str, list[str]] = {}  # from the last probe: voice -> languages

    async def load(self) -> None:
        self._channel = open_channel(self.settings.endpoint, self.settings.use_tls, self.settings.ssl_root_cert)
        self._stub = riva_tts_pb2_grpc.RivaSpeechSynthesisStub(self._channel)
        # SynthesizeOnline called unary-request: the one request and the half-close leave with
        # the call, so there is no write() that could fail (see the module docstring).
        service = riva_tts_pb2.DESCRIPTOR.services_by_name["RivaSpeechSynthesis"].full_name
        self._synthesize_online = self._channel.unary_stream(
            f"/{service}/SynthesizeOnline", request_serializer=riva_tts_pb2.SynthesizeSpeechRequest.SerializeToString,
            response_deserializer=riva_tts_pb2.SynthesizeSpeechResponse.FromString)
        log.info("riva tts at %s (tls %s, credentials %s)", self.settings.endpoint, self.settings.use_tls,
                 self._key.source if self._key else "none")
        if self._key and not self.settings.use_tls and not self.settings.endpoint.startswith(("127.", "localhost")):
            log.warning("riva: the API key goes to %s without TLS; NVCF needs --use-tls true", self.settings.endpoint)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def voices(self) -> list[str]:
        if self._voices:
            return sorted(self._voices)
        return [self.settings.voice] if self.settings.voice else []

    def info(self) -> ProviderInfo:
        details = {"endpoint": self.settings.endpoint, "tls": str(self.settings.use_tls).lower(),
                   "voice": self.settings.voice or "server default", "language": self.settings.language,
                   "encoding": "LINEAR_PCM", "sample_rate_hz": str(self.sample_rate_hz)}
        if self.settings.function_id:
            details["function_id"] = self.settings.function_id
        if self._voices:
            details["voices"] = ",".join(sorted(self._voices))
        return ProviderInfo(provider=self.name, model=self.settings.voice or "server default",
                            sample_rates_hz=(self.sample_rate_hz,), details=details)

    async def probe(self) -> str | None:
        """GetRivaSynthesisConfig: reachable, key accepted, and the configured voice there."""
        try:
            response = await self._stub.GetRivaSynthesisConfig(riva_tts_pb2.RivaSynthesisConfigRequest(),
                                                               metadata=self._metadata, timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None  # reachable and authorised; this server just does not describe itself
            return riva_error(err, f"health probe of {self.settings.endpoint}").message
        self._voices = listed_voices(response)
        if self.settings.voice and self._voices and self.settings.voice not in self._voices:
            return f"riva: voice {self.settings.voice!r} does not exist at {self.settings.endpoint}; " \
                   f"available: {', '.join(sorted(self._voices))}"
        return None

    def _request(self, request: SynthesisRequest):
        voice = request.voice or self.settings.voice
        served = sorted({code for codes in self._voices.values() for code in codes})
        language = resolve_language(request.language, self.settings.language, served)
        if voice and voice in self._voices and self._voices[voice] and language not in self._voices[voice]:
            language = self._voices[voice][0]  # a voice speaks its own language; Riva refuses others
        elif served and language not in served:
            raise InvalidInput(f"riva: no voice for language {language!r} at {self.settings.endpoint}; "
                               f"available: {', '.join(served)}")
        text = request.text
        if abs(request.speed - 1.0) > 1e-3:  # Riva's SSML takes the rate as a percentage
            text = f'<speak><prosody rate="{round(request.speed * 100)}%">{escape(text)}</prosody></speak>'
        message = riva_tts_pb2.SynthesizeSpeechRequest(
            text=text, language_code=language, encoding=riva_audio_pb2.AudioEncoding.LINEAR_PCM,
            sample_rate_hz=self.sample_rate_hz, voice_name=voice,
        )
        available = f"; available: {', '.join(sorted(self._voices))}" if self._voices else ""
        missing = (f"voice {voice!r} does not exist at {self.settings.endpoint}{available}" if voice
                   else f"no voice for language {language!r} at {self.settings.endpoint}{available}")
        return message, missing, bool(voice)

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[bytes]:
        message, missing, named = self._request(request)

        async def open_call():
            """The call up to its first response: a transient failure until then is retried (no
            audio has gone out), one after it ends the sentence."""
            call = self._synthesize_online(message, metadata=self._metadata)
            try:
                return call, await call.read()
            except grpc.aio.AioRpcError as err:
                raise riva_error(err, "synthesis", missing, named) from None
            except BaseException:
                call.cancel()
                raise

        call, response = await open_with_retry(open_call, "riva synthesis")
        carry = b""  # PCM16 is whole samples; a chunk split mid-sample waits for its other byte
        try:
            while response is not grpc.aio.EOF:
                data = carry + response.audio
                cut = len(data) - len(data) % 2
                carry = data[cut:]
                if cut:
                    yield data[:cut]
                response = await call.read()
        except grpc.aio.AioRpcError as err:
            raise riva_error(err, "synthesis", missing, named) from None
        finally:
            if not call.done():  # closed early (barge-in, caller gone): stop Riva's work now
                call.cancel()
