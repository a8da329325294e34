"""The engines of bench/pipecat_embedded.py as Pipecat services (bench/.venv-pipecat only).

- `MeshDecodingWhisper`: Pipecat's WhisperSTTService (faster-whisper) on the mesh's
  whisper-base folder, with the mesh's engine settings (CPU, int8, 2 threads, greedy decoding,
  no VAD filter, no timestamps: voicemesh.stt.providers.whisper). Pipecat's own defaults
  would be beam 5 and the model's stored precision; matching them keeps the comparison about
  the pipelines, not the decoder. The model loads once and is shared across turns.
- `HibariTTSService`: a TTSService that runs hibari in-process (its wheel needs only numpy
  and onnxruntime, which this venv has at the same versions as the main one), one sentence
  per run_tts (Pipecat's sentence aggregation), each phrase rendered off the event loop and
  handed out in 100 ms chunks, onnxruntime with 2 threads that do not spin, like the mesh's
  hibari provider. In-process because that is how Pipecat runs local engines (Piper, Kokoro).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pipecat.frames.frames import ErrorFrame
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.transcriptions.language import Language

HIBARI_RATE_HZ = 24000
CHUNK_BYTES = 2 * HIBARI_RATE_HZ // 10  # 100 ms, as the mesh's hibari provider


class _MeshDecoding:
    """A WhisperModel whose transcribe() uses the mesh's decoding options."""

    def __init__(self, model):
        self._model = model
        self.supported_languages = model.supported_languages

    def transcribe(self, audio, **kwargs):
        return self._model.transcribe(audio, **kwargs, beam_size=1, vad_filter=False,
                                      condition_on_previous_text=False, without_timestamps=True)


def load_whisper(model_dir: str, threads: int):
    from faster_whisper import WhisperModel

    model = WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=threads, num_workers=1,
                         local_files_only=True)
    model.transcribe(np.zeros(16000, np.float32), language="en", beam_size=1)  # warm-up, as the mesh's
    return _MeshDecoding(model)


class MeshDecodingWhisper(WhisperSTTService):
    def __init__(self, shared_model: _MeshDecoding, model_dir: str, **kwargs):
        self._shared_model = shared_model
        super().__init__(device="cpu", compute_type="int8",
                         settings=WhisperSTTService.Settings(model=model_dir, language=Language.EN), **kwargs)

    def _load(self):
        self._model = self._shared_model  # loaded once (load_whisper), not per pipeline


@dataclass
class HibariEngine:
    """hibari's model and G2P, loaded once; renders on one worker thread (its G2P is plain
    Python state), like the mesh's provider."""

    threads: int = 2
    voice: str = "heart"

    def __post_init__(self):
        import onnxruntime as ort
        from hibari import Hibari

        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hibari")
        self.engine = Hibari(voice=self.voice, threads=1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.engine.sess = ort.InferenceSession(self.engine.model_path, options, providers=["CPUExecutionProvider"])
        self.engine("Warm up.")

    def phrases(self, text: str) -> list[str]:
        return self.engine.phonemize(text)

    def render(self, phonemes: str, rng: np.random.Generator) -> bytes:
        audio = self.engine.from_ids(self.engine.ids(phonemes), 1.0, rng)
        return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class HibariTTSService(TTSService):
    """One per pipeline over a shared HibariEngine; remembers when it was first asked for
    speech and when its first audio came out (the TTS's time to first audio)."""

    def __init__(self, engine: HibariEngine, **kwargs):
        super().__init__(push_start_frame=True, push_stop_frames=True, sample_rate=HIBARI_RATE_HZ,
                         settings=TTSSettings(model="hibari", voice=engine.voice, language=None), **kwargs)
        self.engine = engine
        self.first_request: list[float] = []
        self.first_audio: list[float] = []

    def can_generate_metrics(self) -> bool:
        return True

    async def run_tts(self, text: str, context_id: str):
        self.first_request.append(time.monotonic())
        loop = asyncio.get_running_loop()
        rng = np.random.default_rng()
        try:
            await self.start_tts_usage_metrics(text)
            phrases = await loop.run_in_executor(self.engine.executor, self.engine.phrases, text)

            async def chunks():
                pending = loop.run_in_executor(self.engine.executor, self.engine.render, phrases[0], rng) if phrases else None
                for index in range(len(phrases)):
                    pcm = await pending
                    # The next phrase starts before this one is handed out, so it is ready in time.
                    nxt = index + 1
                    pending = loop.run_in_executor(self.engine.executor, self.engine.render, phrases[nxt], rng) \
                        if nxt < len(phrases) else None
                    for offset in range(0, len(pcm), CHUNK_BYTES):
                        yield pcm[offset : offset + CHUNK_BYTES]

            async for frame in self._stream_audio_frames_from_iterator(chunks(), in_sample_rate=HIBARI_RATE_HZ,
                                                                       context_id=context_id):
                self.first_audio.append(time.monotonic())
                await self.stop_ttfb_metrics()
                yield frame
        except Exception as err:  # noqa: BLE001 - Pipecat's services report failures as ErrorFrames
            yield ErrorFrame(error=f"hibari failed: {err}")
        finally:
            await self.stop_ttfb_metrics()

