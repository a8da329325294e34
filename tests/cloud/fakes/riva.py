"""A fake NVIDIA Riva server: the riva client wheel's own gRPC stubs, served by grpc.aio on 127.0.0.1.

It implements what voicemesh's Riva providers call, the way Riva answers:
- RivaSpeechRecognition.StreamingRecognize: the first request must be `streaming_config`;
  while audio comes, an interim (`backend.interim`) after every ~300 ms of audio when interim
  results were asked for; when the client half-closes, `backend.recognize(all audio)` becomes
  one final result with words (ms from the first sample) when word offsets were asked for.
- RivaSpeechRecognition.GetRivaSpeechRecognitionConfig: the `asr_models` it serves
  (model name -> language), all of type "online".
- RivaSpeechSynthesis.SynthesizeOnline: one request (text, language, LINEAR_PCM, rate, voice);
  audio chunks as the backend yields them.
- RivaSpeechSynthesis.GetRivaSynthesisConfig: `voices` ("<voice_name>.<subvoice>" -> language),
  grouped by voice_name with `subvoices` as Riva lists them.

Failures: `fail_next(kind)` makes the next streaming call fail with Riva's status for it (the
config RPCs, which the providers' health probes call, never consume one). With `api_key` /
`function_id` set, every call must carry NVCF's `authorization: Bearer <key>` and
`function-id` metadata, as NVCF requires. `pause()` stops the server (gone), `resume()` brings
it back on the same port.

Recorded: "stt_metadata"/"tts_metadata"/"config_metadata" (dict of a streaming or config call's metadata), "stt_config" (dict),
"audio" (bytes, per message), "stream_closed" (total audio bytes: the client half-closed; a
cancelled call never records it), "cancelled" ("stt" or "tts": the client cancelled the call),
"tts_request" (dict), "tts_chunk" (bytes), "tts_done" (chunk count), "config_rpc" ("asr"/"tts").

Any backend of the backends.py interfaces works (VoicemeshStt / VoicemeshTts for the swap test):
    FakeRiva(stt_backend=VoicemeshStt(addr), tts_backend=VoicemeshTts(addr), api_key=..., function_id=...)
"""
from __future__ import annotations

import asyncio

import grpc
from riva.client.proto import riva_asr_pb2, riva_asr_pb2_grpc, riva_audio_pb2, riva_tts_pb2, riva_tts_pb2_grpc

from cloud.fakes.backends import ScriptedStt, ToneTts
from cloud.fakes.base import FakeProvider

LINEAR_PCM = riva_audio_pb2.AudioEncoding.LINEAR_PCM
DEFAULT_ASR_MODELS = {"conformer-en-US-asr-streaming": "en-US", "conformer-de-DE-asr-streaming": "de-DE"}
DEFAULT_VOICES = {"English-US.Female-1": "en-US", "English-US.Male-1": "en-US", "German-DE.Male-1": "de-DE"}
INTERIM_EVERY_MS = 300

# What Riva (and NVCF in front of it) answers for each error class.
STT_FAILURES = {
    "auth": (grpc.StatusCode.UNAUTHENTICATED, "Authentication failed: invalid or expired API key"),
    "throttle": (grpc.StatusCode.RESOURCE_EXHAUSTED, "Rate limit exceeded, too many requests"),
    "not_found": (grpc.StatusCode.INVALID_ARGUMENT,
                  "Error: Unavailable model requested given these parameters: language_code={language}; "
                  "sample_rate=16000; type=online; model={model}"),
    "bad_format": (grpc.StatusCode.INVALID_ARGUMENT, "Error: config format doesn't match with header format"),
    "unavailable": (grpc.StatusCode.UNAVAILABLE, "Error: Triton server is not ready"),
}
TTS_FAILURES = {
    **STT_FAILURES,
    "not_found": (grpc.StatusCode.INVALID_ARGUMENT,
                  "Error: Model is not available on server: Voice {voice} for language {language} not found. "
                  "Please specify the voice name in your SynthesizeSpeechRequest."),
    "bad_format": (grpc.StatusCode.INVALID_ARGUMENT, "Error: Unsupported encoding, only LINEAR_PCM and OGGOPUS"),
}


class FakeRiva(FakeProvider):
    name = "riva"

    def __init__(self, stt_backend=None, tts_backend=None, api_key: str = "", function_id: str = "",
                 asr_models: dict[str, str] | None = None, voices: dict[str, str] | None = None):
        super().__init__()
        self.stt_backend = stt_backend or ScriptedStt()
        self.tts_backend = tts_backend or ToneTts()
        self.api_key = api_key  # required as "authorization: Bearer <key>" when set
        self.function_id = function_id  # required as "function-id" when set
        self.asr_models = dict(DEFAULT_ASR_MODELS if asr_models is None else asr_models)
        self.voices = dict(DEFAULT_VOICES if voices is None else voices)
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- lifecycle ---------------------------------------------------------------------------
    async def _start(self) -> None:
        self._server = grpc.aio.server()
        riva_asr_pb2_grpc.add_RivaSpeechRecognitionServicer_to_server(_Asr(self), self._server)
        riva_tts_pb2_grpc.add_RivaSpeechSynthesisServicer_to_server(_Tts(self), self._server)
        port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, f"fake riva: cannot bind 127.0.0.1:{self.port}"
        self.port = port
        await self._server.start()

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    def pause(self) -> None:
        """The server is gone (connections refused) until resume()."""
        self.call(self._stop())

    def resume(self) -> None:
        self.call(self._start())

    # --- what every call checks ----------------------------------------------------------------
    def cancelled(self, kind: str, call: list) -> None:
        """Record "cancelled" once per call (`call`: a one-item list, set once recorded)."""
        if not call:
            call.append(True)
            self.record("cancelled", kind)

    async def check_call(self, context: grpc.aio.ServicerContext, kind: str, failures: dict | None = None,
                         **names) -> None:
        """NVCF's metadata, then a failure asked for with fail_next (streaming calls only)."""
        metadata = {key: value for key, value in (context.invocation_metadata() or ())}
        self.record(f"{kind}_metadata", metadata)
        if self.api_key and metadata.get("authorization") != f"Bearer {self.api_key}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Authentication failed: invalid or missing bearer token")
        if self.function_id and metadata.get("function-id") != self.function_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Function '{metadata.get('function-id', '')}': Not found")
        if failures is not None and (failure := self.take_failure()):
            code, message = failures[failure]
            await context.abort(code, message.format(**names))


class _Asr(riva_asr_pb2_grpc.RivaSpeechRecognitionServicer):
    def __init__(self, fake: FakeRiva):
        self.fake = fake

    async def GetRivaSpeechRecognitionConfig(self, request, context):
        await self.fake.check_call(context, "config")
        self.fake.record("config_rpc", "asr")
        response = riva_asr_pb2.RivaSpeechRecognitionConfigResponse()
        for model, language in self.fake.asr_models.items():
            if not request.model_name or request.model_name == model:
                response.model_config.add(model_name=model, parameters={"language_code": language, "type": "online",
                                                                        "sample_rate": "16000"})
        return response

    async def StreamingRecognize(self, request_iterator, context):
        async for response in _watching_cancel(self.fake, "stt", context, self._recognize(request_iterator, context)):
            yield response

    async def _recognize(self, request_iterator, context):
        fake = self.fake
        first = await anext(aiter(request_iterator))
        if first.WhichOneof("streaming_request") != "streaming_config":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Error: the first request must be a streaming_config")
        streaming = first.streaming_config
        config = streaming.config
        fake.record("stt_config", {
            "encoding": config.encoding, "sample_rate_hertz": config.sample_rate_hertz, "language": config.language_code,
            "model": config.model, "word_time_offsets": config.enable_word_time_offsets,
            "punctuation": config.enable_automatic_punctuation, "interim_results": streaming.interim_results,
        })
        await fake.check_call(context, "stt", STT_FAILURES, language=config.language_code, model=config.model)
        served = [m for m, lang in fake.asr_models.items() if lang == config.language_code]
        if not served or (config.model and config.model not in served):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, STT_FAILURES["not_found"][1].format(
                language=config.language_code, model=config.model))
        if config.encoding != LINEAR_PCM or not 8000 <= config.sample_rate_hertz <= 48000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, STT_FAILURES["bad_format"][1])
        rate = config.sample_rate_hertz
        audio = bytearray()
        next_interim = rate * 2 * INTERIM_EVERY_MS // 1000
        async for request in request_iterator:
            if not request.audio_content:
                continue
            audio += request.audio_content
            fake.record("audio", bytes(request.audio_content))
            if streaming.interim_results and len(audio) >= next_interim:
                next_interim += rate * 2 * INTERIM_EVERY_MS // 1000
                if text := fake.stt_backend.interim(bytes(audio), rate):
                    yield _response(text, False, 0.1, len(audio) / (2 * rate))
        # The requests end on a half-close and on a cancel alike; an empty response (Riva sends
        # those too) tells them apart: its send fails when the client has cancelled.
        yield riva_asr_pb2.StreamingRecognizeResponse()
        fake.record("stream_closed", len(audio))
        if not audio:
            return  # Riva has nothing to say about no audio
        recognized = await fake.stt_backend.recognize(bytes(audio), rate, config.language_code)
        if recognized.text:
            words = recognized.words if config.enable_word_time_offsets else ()
            yield _response(recognized.text + " ", True, 1.0, len(audio) / (2 * rate), words, recognized.confidence)


async def _watching_cancel(fake: FakeRiva, kind: str, context, responses):
    """`responses`, recording "cancelled" when the client cancels the call: the handler is then
    cancelled, or closed at a yield whose send failed, or (once over) the context says so."""
    once: list = []
    context.add_done_callback(lambda ctx: fake.cancelled(kind, once) if ctx.cancelled() else None)
    try:
        async for response in responses:
            yield response
    except (asyncio.CancelledError, GeneratorExit):
        fake.cancelled(kind, once)
        raise


def _response(text: str, is_final: bool, stability: float, processed_s: float, words=(), confidence: float = 0.0):
    result = riva_asr_pb2.StreamingRecognitionResult(is_final=is_final, stability=stability, audio_processed=processed_s)
    alternative = result.alternatives.add(transcript=text, confidence=confidence)
    for word in words:
        alternative.words.add(word=word.text, start_time=word.start_ms, end_time=word.end_ms, confidence=word.confidence)
    return riva_asr_pb2.StreamingRecognizeResponse(results=[result])


class _Tts(riva_tts_pb2_grpc.RivaSpeechSynthesisServicer):
    def __init__(self, fake: FakeRiva):
        self.fake = fake

    async def GetRivaSynthesisConfig(self, request, context):
        await self.fake.check_call(context, "config")
        self.fake.record("config_rpc", "tts")
        groups: dict[tuple[str, str], list[str]] = {}
        for voice, language in self.fake.voices.items():
            voice_name, _, subvoice = voice.partition(".")
            groups.setdefault((voice_name, language), []).append(subvoice)
        response = riva_tts_pb2.RivaSynthesisConfigResponse()
        for (voice_name, language), subvoices in groups.items():
            response.model_config.add(model_name=f"fastpitch_hifigan_ensemble-{voice_name}", parameters={
                "language_code": language, "voice_name": voice_name,
                "subvoices": ",".join(f"{sub}:{i}" for i, sub in enumerate(subvoices)),
            })
        return response

    async def SynthesizeOnline(self, request_iterator, context):
        async for response in _watching_cancel(self.fake, "tts", context, self._synthesize(request_iterator, context)):
            yield response

    async def _synthesize(self, request_iterator, context):
        fake = self.fake
        chunks = 0
        request = await anext(aiter(request_iterator))
        fake.record("tts_request", {"text": request.text, "voice": request.voice_name, "language": request.language_code,
                                    "encoding": request.encoding, "sample_rate_hz": request.sample_rate_hz})
        voice = request.voice_name
        await fake.check_call(context, "tts", TTS_FAILURES, voice=voice, language=request.language_code)
        languages = set(fake.voices.values())
        if (voice and voice not in fake.voices) or request.language_code not in languages:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, TTS_FAILURES["not_found"][1].format(
                voice=voice, language=request.language_code))
        if request.encoding != LINEAR_PCM or not 8000 <= request.sample_rate_hz <= 48000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, TTS_FAILURES["bad_format"][1])
        async for chunk in fake.tts_backend.synthesize(request.text, request.sample_rate_hz, voice):
            chunks += 1
            fake.record("tts_chunk", chunk)
            yield riva_tts_pb2.SynthesizeSpeechResponse(audio=chunk)
        fake.record("tts_done", chunks)
