"""NVIDIA Riva speech recognition (on-prem Riva, or NVIDIA-hosted NVCF) over Riva's gRPC API.

How the interface maps onto Riva:
- One `StreamingRecognize` call per utterance (UtteranceSttStream, utterances.py): the first
  request is the `streaming_config` (LINEAR_PCM, 16 kHz: the servicer hands every provider
  PCM16 mono 16 kHz, so nothing is resampled here; language; word time offsets; interim
  results), then `audio_content` messages. The utterance's end half-closes the request stream,
  which makes Riva decode what it has and send its final at once instead of after its own
  endpointing silence; cancel is `call.cancel()`, which stops the decoding (and the billing on
  NVCF) when the user barges in or hangs up.
- Riva results carry `is_final`, `stability` and alternatives with words (start/end in ms
  from the first sample of the request, confidence): the first alternative becomes an
  SttTranscript with its Words. Non-final results of one response (Riva splits a hypothesis
  into a stable and an unstable part) are joined into one interim.
- The stubs are the riva client's own (`riva.client.proto.riva_asr_pb2_grpc`) on grpc's
  blocking client, with the requests in a queue (grpc's own thread writes them) and one reader
  thread per call handing responses to the event loop. Not grpc.aio: when Riva refuses a call
  (a bad key, throttling, an unknown model) while audio is being written, grpc.aio's failed
  `write()` replaces Riva's status with "INTERNAL: Internal error from Core" (grpcio 1.80), and
  the caller would never learn what to fix. `riva.client.proto.health_pb2` is never imported:
  it declares `grpc.health.v1` again, which clashes with the runtime's health service.
- Health: `GetRivaSpeechRecognitionConfig` is the probe (free, no audio, checks the key on
  NVCF); it also tells which languages and models the server streams, so an unsupported
  language or a model that is not deployed is refused before any audio leaves.
- NVCF (grpc.nvcf.nvidia.com:443) needs TLS, `authorization: Bearer <NVIDIA_API_KEY>` and the
  `function-id` of the deployed model as call metadata; a self-hosted Riva is plain host:50051.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from riva.client.proto import riva_asr_pb2, riva_asr_pb2_grpc, riva_audio_pb2  # never health_pb2 (see above)

from voicemesh.runtime.errors import (
    DeadlineExceeded, FailedPrecondition, InvalidInput, NotFound, PermissionDenied, ResourceExhausted, StreamError,
    Unauthenticated, Unavailable,
)
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.upstream import read_secret
from voicemesh.stt.providers.base import SttProvider, SttStream, SttStreamConfig, SttTranscript, Word
from voicemesh.stt.providers.utterances import UpstreamRecognition, UtteranceSttStream

log = logging.getLogger(__name__)

RATE_HZ = 16000  # what the servicer hands every provider, and what Riva's streaming models run at
PROBE_TIMEOUT_S = 5.0
_END = object()
MAX_AUDIO_MESSAGE = RATE_HZ * 2  # 1 s: a backlog is sent as several messages, never one huge one
KEY_ENV = ("NVIDIA_API_KEY",)


@dataclass
class RivaSttSettings:
    endpoint: str = field(default="localhost:50051", metadata={
        "help": "Riva gRPC host:port: a self-hosted Riva is host:50051 (plain); NVIDIA-hosted is grpc.nvcf.nvidia.com:443 "
                "with --use-tls and --function-id"})
    use_tls: bool = field(default=False, metadata={"help": "connect with TLS (required for NVCF)"})
    ssl_root_cert: str = field(default="", metadata={"help": "PEM file of the CA that signed a self-hosted Riva's TLS "
                                                             "certificate (default: the system roots)"})
    language: str = field(default="en-US", metadata={
        "help": "default language when the caller sends none (BCP-47 as Riva names it, e.g. en-US, de-DE)"})
    model: str = field(default="", metadata={"help": "Riva ASR model name (default: the server's streaming model for "
                                                     "the language)"})
    function_id: str = field(default="", metadata={"help": "NVCF function id of the hosted ASR model (sent as "
                                                           "function-id metadata); empty for a self-hosted Riva"})
    api_key_file: str = field(default="", metadata={"help": "file holding the NVIDIA API key (a mounted secret); "
                                                            "else env NVIDIA_API_KEY; required with --function-id"})
    punctuation: bool = field(default=True, metadata={"help": "ask Riva for automatic punctuation"})


# --- shared with the TTS provider (voicemesh/tts/providers/riva.py has the same few lines) ------
def open_channel(endpoint: str, use_tls: bool, root_cert: str) -> grpc.Channel:
    # Reconnect within seconds once Riva is back (gRPC's default backoff grows to two minutes).
    options = [("grpc.max_receive_message_length", 16 << 20), ("grpc.initial_reconnect_backoff_ms", 500),
               ("grpc.max_reconnect_backoff_ms", 5000)]
    if not use_tls:
        return grpc.insecure_channel(endpoint, options=options)
    pem = Path(root_cert).read_bytes() if root_cert else None
    return grpc.secure_channel(endpoint, grpc.ssl_channel_credentials(root_certificates=pem), options=options)


def call_metadata(key, function_id: str) -> tuple[tuple[str, str], ...]:
    """NVCF's routing and auth headers (per call: insecure channels take no call credentials)."""
    metadata = []
    if key:
        metadata.append(("authorization", f"Bearer {key.reveal()}"))
    if function_id:
        metadata.append(("function-id", function_id))
    return tuple(metadata)


def riva_error(err: grpc.RpcError, what: str, missing: str = "", named: bool = True) -> StreamError:
    """The StreamError for a Riva status. Riva answers a model, voice or language it lacks with
    INVALID_ARGUMENT ('Unavailable model requested ...', '... not available ...'): `missing` says
    what that was; NOT_FOUND when the request `named` a model or voice, else (the language alone
    chose it) INVALID_ARGUMENT."""
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
        return NotFound(message + "; check --function-id and --model")
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
    """The language code to send: `asked` or the default; a bare 'en' becomes the served 'en-*'
    (the default's if it is one). Unchecked when the server's list is unknown."""
    language = asked or default
    if not served or language in served:
        return language
    matches = [code for code in served if code.lower().split("-")[0] == language.lower()]
    if matches:
        return default if default in matches else matches[0]
    return language


# --- one utterance -------------------------------------------------------------------------
class RivaRecognition(UpstreamRecognition):
    """One StreamingRecognize call on the blocking client: grpc's own thread writes the queued
    requests, a reader thread hands the responses to the event loop."""

    def __init__(self, stub, first_request, metadata, language: str, missing: str, named: bool):
        self._language = language
        self._missing = missing
        self._named = named
        self._cancelled = False
        self._loop = asyncio.get_running_loop()
        self._out: asyncio.Queue = asyncio.Queue()  # responses, then _END or the grpc.RpcError
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put(first_request)
        self._call = stub.StreamingRecognize(iter(self._requests.get, _END), metadata=metadata)
        threading.Thread(target=self._read, name="riva-asr-reader", daemon=True).start()

    async def send(self, pcm16: bytes) -> None:
        pb2 = riva_asr_pb2
        for begin in range(0, len(pcm16), MAX_AUDIO_MESSAGE):
            self._requests.put(pb2.StreamingRecognizeRequest(audio_content=pcm16[begin:begin + MAX_AUDIO_MESSAGE]))

    async def end(self) -> None:
        self._requests.put(_END)  # the half-close: Riva sends its final

    async def results(self) -> AsyncIterator[SttTranscript]:
        while (item := await self._out.get()) is not _END:
            if isinstance(item, grpc.RpcError):
                if self._cancelled and item.code() == grpc.StatusCode.CANCELLED:
                    return
                raise riva_error(item, "streaming recognition", self._missing, self._named)
            for transcript in transcripts(item, self._language):
                yield transcript

    async def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()  # RST_STREAM: Riva stops decoding at once
        self._requests.put(_END)  # and grpc's writer thread, blocked on the queue, ends

    def _read(self) -> None:
        try:
            for response in self._call:
                self._post(response)
            self._post(_END)
        except grpc.RpcError as err:
            self._post(err)
        finally:
            self._requests.put(_END)  # the call is over (an error, say): nothing more will be written

    def _post(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is reading any more
            self._loop.call_soon_threadsafe(self._out.put_nowait, item)


def transcripts(response, language: str) -> list[SttTranscript]:
    """Riva's results as SttTranscripts: each final on its own, the non-finals joined into one."""
    out: list[SttTranscript] = []
    interim: list[SttTranscript] = []
    for result in response.results:
        if not result.alternatives:
            continue
        best = result.alternatives[0]
        words = tuple(Word(w.word, w.start_time, w.end_time, w.confidence) for w in best.words)
        end_ms = words[-1].end_ms if words else int(result.audio_processed * 1000)
        transcript = SttTranscript(
            text=best.transcript.strip(), is_final=result.is_final, stability=1.0 if result.is_final else result.stability,
            confidence=best.confidence if result.is_final else 0.0,
            language=best.language_code[0] if best.language_code else language,
            start_ms=words[0].start_ms if words else 0, end_ms=end_ms, words=words,
        )
        (out if result.is_final else interim).append(transcript)
    if interim:
        words = tuple(w for part in interim for w in part.words)
        out.append(SttTranscript(
            text=" ".join(part.text for part in interim if part.text), is_final=False,
            stability=min(part.stability for part in interim), language=interim[0].language,
            start_ms=interim[0].start_ms, end_ms=max(part.end_ms for part in interim), words=words,
        ))
    return out


# --- the provider --------------------------------------------------------------------------
class RivaSttProvider(SttProvider):
    name = "riva"
    settings_class = RivaSttSettings

    def __init__(self, settings: RivaSttSettings):
        self.settings = settings
        self._key = read_secret(settings.api_key_file, KEY_ENV, "riva", required=bool(settings.function_id))
        self._metadata = call_metadata(self._key, settings.function_id)
        self._channel: grpc.Channel | None = None
        self._stub = None
        self._served: dict[str, list[str]] = {}  # language -> streaming models, from the last probe
        self._state: grpc.ChannelConnectivity | None = None  # the channel's, kept by grpc's callback

    async def load(self) -> None:
        self._channel = open_channel(self.settings.endpoint, self.settings.use_tls, self.settings.ssl_root_cert)
        self._stub = riva_asr_pb2_grpc.RivaSpeechRecognitionStub(self._channel)
        self._channel.subscribe(self._on_state, try_to_connect=True)
        log.info("riva asr at %s (tls %s, credentials %s)", self.settings.endpoint, self.settings.use_tls,
                 self._key.source if self._key else "none")
        if self._key and not self.settings.use_tls and not self.settings.endpoint.startswith(("127.", "localhost")):
            log.warning("riva: the API key goes to %s without TLS; NVCF needs --use-tls true", self.settings.endpoint)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        self._state = state  # from grpc's thread; read on the loop (a plain attribute swap)

    async def close(self) -> None:
        if self._channel is not None:
            self._channel.unsubscribe(self._on_state)
            self._channel.close()

    def info(self) -> ProviderInfo:
        details = {"endpoint": self.settings.endpoint, "tls": str(self.settings.use_tls).lower(),
                   "language": self.settings.language, "encoding": "LINEAR_PCM", "word_time_offsets": "true"}
        if self.settings.function_id:
            details["function_id"] = self.settings.function_id
        if self._served:
            details["languages"] = ",".join(sorted(self._served))
        return ProviderInfo(provider=self.name, model=self.settings.model or "server default", sample_rates_hz=(RATE_HZ,),
                            details=details)

    async def probe(self) -> str | None:
        """GetRivaSpeechRecognitionConfig: reachable, key accepted, and the model served."""
        request = riva_asr_pb2.RivaSpeechRecognitionConfigRequest()
        try:
            response = await asyncio.to_thread(self._stub.GetRivaSpeechRecognitionConfig, request, metadata=self._metadata,
                                               timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None  # reachable and authorised; this server just does not describe itself
            return riva_error(err, f"health probe of {self.settings.endpoint}").message
        served: dict[str, list[str]] = {}
        for config in response.model_config:
            if config.parameters.get("type", "online") != "online":
                continue  # offline (batch) models cannot stream
            for language in config.parameters.get("language_code", "").split(","):
                if language.strip():
                    served.setdefault(language.strip(), []).append(config.model_name)
        self._served = served
        models = sorted({m for names in served.values() for m in names})
        if self.settings.model and served and self.settings.model not in models:
            return f"riva: model {self.settings.model!r} is not deployed at {self.settings.endpoint}; " \
                   f"streaming models: {', '.join(models)}"
        return None

    def open_stream(self, config: SttStreamConfig) -> SttStream:
        return UtteranceSttStream(config, self._open, "riva")

    async def _open(self, config: SttStreamConfig) -> RivaRecognition:
        pb2 = riva_asr_pb2
        language = resolve_language(config.language, self.settings.language, sorted(self._served))
        if self._served and language not in self._served:
            raise InvalidInput(f"riva: language {language!r} has no streaming model at {self.settings.endpoint}; "
                               f"available: {', '.join(sorted(self._served))}")
        model = self.settings.model
        missing = (f"model {model!r} for {language} is not deployed at {self.settings.endpoint}" if model
                   else f"no streaming model for language {language!r} at {self.settings.endpoint}")
        recognition = pb2.RecognitionConfig(
            encoding=riva_audio_pb2.AudioEncoding.LINEAR_PCM, sample_rate_hertz=config.sample_rate_hz,
            language_code=language, max_alternatives=1, audio_channel_count=1, enable_word_time_offsets=True,
            enable_automatic_punctuation=self.settings.punctuation, model=model,
        )
        streaming = pb2.StreamingRecognitionConfig(config=recognition, interim_results=config.interim_results)
        if self._state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            # Refused here, the failure is the opener's, which open_with_retry retries; once a
            # call is open, its failure ends the utterance (results() raises it).
            raise Unavailable(f"riva: cannot connect to {self.settings.endpoint}; is Riva running there?")
        return RivaRecognition(self._stub, pb2.StreamingRecognizeRequest(streaming_config=streaming), self._metadata,
                               language, missing, bool(model))

