"""Embedded Whisper STT: faster-whisper (CTranslate2), int8 on the CPU.

Whisper is not a streaming model: its encoder always runs on a full 30 s window, so one
decode costs ~0.4-0.6 s (base, 2 threads) whatever the audio length. Streaming is built on
top: a stream keeps the last 30 s of audio; the open utterance (turn_start .. finalize) is
re-decoded as it grows for interim results, and once more at finalize for the final one.

Decodes use faster-whisper's BatchedInferencePipeline on one clip: it decodes the window
once (greedy, no VAD, no timestamp tokens) and aligns words for ~5-15% more time, whereas
the sequential `transcribe` with word timestamps seeks past the last word and decodes the
trailing silence again (measured ~4x slower; it hallucinated "Thanks." there). That
pipeline skips Whisper's no-speech rule, so we apply it ourselves.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from voicemesh.runtime.config import env_value
from voicemesh.runtime.cpu import EngineCpu, engine_threads, set_omp_wait_policy, wait_policy
from voicemesh.runtime.models import model_path
from voicemesh.stt.models import WHISPER_BASE
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.stt.providers.base import SttProvider, SttStream, SttStreamConfig, Word
from voicemesh.stt.providers.decode_queue import DecodeJob, DecodeQueue
from voicemesh.stt.providers.whisper_stream import (
    INTERIM_EVERY_MS, LOG_PROB_FLOOR, NO_SPEECH_PROB, WHISPER_RATE_HZ, WhisperSttStream, _Decoded,
)

log = logging.getLogger(__name__)
DEFAULT_THREADS = 2  # at most; fewer when the process has fewer CPUs (runtime/cpu.py)
DEFAULT_LANGUAGE = "en"


def _whisper_language(bcp47: str) -> str:
    return bcp47.split("-")[0].lower()  # Whisper names languages by ISO 639-1: "en-US" -> "en"


class WhisperSttProvider(SttProvider):
    """Whisper via faster-whisper. model_dir: a CTranslate2 Whisper folder (default: the
    embedded whisper-base, env VOICEMESH_STT_MODEL_DIR); cpu_threads: CTranslate2 intra-op
    threads (env VOICEMESH_STT_THREADS, else 2, or the CPUs available if fewer); language:
    default when a stream names none (env VOICEMESH_STT_LANGUAGE, else "en"); word_timestamps:
    word times on finals (env VOICEMESH_STT_WORD_TIMESTAMPS, default on; off saves ~5-15% of
    the final decode).

    All decodes, from every stream, run one at a time on one dedicated thread: the model
    already uses `cpu_threads` cores, and parallel decodes would only slow each other down.
    Finals go first, and interims nobody needs any more are dropped unrun (decode_queue.py).
    """

    name = "whisper"

    def __init__(
        self, model_dir: str | os.PathLike | None = None, cpu_threads: int | None = None,
        language: str | None = None, word_timestamps: bool | None = None,
    ) -> None:
        self._model_dir = Path(model_dir) if model_dir else None
        self._cpu = EngineCpu(engine_threads("stt", DEFAULT_THREADS, cpu_threads), wait_policy())
        self.cpu_threads = self._cpu.threads.threads
        self.language = _whisper_language(language or env_value("stt", "language", DEFAULT_LANGUAGE))
        if word_timestamps is None:
            word_timestamps = env_value("stt", "word_timestamps", "1").lower() not in ("0", "false", "no", "off")
        self.word_timestamps = word_timestamps
        self._queue = DecodeQueue("whisper")
        self._pipeline = None  # faster_whisper.BatchedInferencePipeline once loaded

    async def load(self) -> None:
        if self._model_dir is None:
            self._model_dir = model_path(WHISPER_BASE)
        # faster-whisper treats a missing folder as a Hub repo id and would try to download it.
        if not (self._model_dir / "model.bin").exists():
            raise FileNotFoundError(f"no Whisper model (model.bin) in {self._model_dir}")
        await self._queue.submit(self._load_sync, final=True).future

    def _load_sync(self) -> None:
        # CTranslate2's OpenMP (its own libgomp) reads the wait policy when it loads: set it first.
        self._cpu = EngineCpu(self._cpu.threads, set_omp_wait_policy("ctranslate2"))
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        started = time.perf_counter()
        model = WhisperModel(
            str(self._model_dir), device="cpu", compute_type="int8",
            cpu_threads=self.cpu_threads, num_workers=1, local_files_only=True,
        )
        self._pipeline = BatchedInferencePipeline(model)
        # Warm-up: the first decode allocates its buffers (measured ~25% slower than the next).
        noise = np.random.default_rng(0).normal(0.0, 0.01, WHISPER_RATE_HZ).astype(np.float32)
        self.decode(noise, self.language, self.word_timestamps)
        log.info("whisper loaded from %s in %.2f s: %s", self._model_dir, time.perf_counter() - started,
                 self._cpu.describe())

    def info(self) -> ProviderInfo:
        return ProviderInfo(
            provider=self.name,
            model=self._model_dir.name if self._model_dir else "whisper-base",
            sample_rates_hz=(WHISPER_RATE_HZ,),
            details={
                "compute_type": "int8", "cpu_threads": str(self.cpu_threads), **self._cpu.details(),
                "language": self.language,
                "word_timestamps": str(self.word_timestamps).lower(), "interim_every_ms": str(INTERIM_EVERY_MS),
            },
        )

    def open_stream(self, config: SttStreamConfig) -> SttStream:
        if self._pipeline is None:
            raise RuntimeError("WhisperSttProvider.open_stream() before load()")
        return WhisperSttStream(self, config, _whisper_language(config.language or self.language))

    async def close(self) -> None:
        self._queue.close()  # what is queued is dropped; a running decode finishes on its thread
        self._pipeline = None

    @property
    def queue(self) -> DecodeQueue:
        return self._queue

    def submit_decode(
        self, audio: np.ndarray, language: str, words: bool, offset_ms: int, final: bool, key: object,
    ) -> DecodeJob:
        """Queue a decode (see decode_queue.py); `key` is the stream, so a newer interim of
        the same stream replaces a queued one."""
        return self._queue.submit(self.decode, audio, language, words, offset_ms, final=final, key=key)

    async def decode_async(self, audio: np.ndarray, language: str, words: bool, offset_ms: int = 0) -> _Decoded:
        """One decode, queued as a final (ahead of interims)."""
        return await self._queue.submit(self.decode, audio, language, words, offset_ms, final=True).future

    def decode(self, audio: np.ndarray, language: str, words: bool, offset_ms: int = 0) -> _Decoded:
        """Blocking, on the executor: float32 16 kHz mono audio (under 30 s) -> text.
        Word times are `offset_ms` (where the audio starts in the stream) plus their time in it."""
        if audio.size == 0:
            return _Decoded("", 0.0, ())
        segments, _ = self._pipeline.transcribe(
            audio, language=language, beam_size=1, vad_filter=False,
            condition_on_previous_text=False, without_timestamps=True, word_timestamps=words,
        )
        kept = [s for s in segments if not (s.no_speech_prob > NO_SPEECH_PROB and s.avg_logprob < LOG_PROB_FLOOR)]
        text = " ".join(s.text.strip() for s in kept).strip()
        confidence = math.exp(sum(s.avg_logprob for s in kept) / len(kept)) if kept else 0.0
        word_list = tuple(
            Word(w.word.strip(), offset_ms + round(w.start * 1000), offset_ms + round(w.end * 1000),
                 float(w.probability))
            for s in kept for w in (s.words or ())
        )
        return _Decoded(text, confidence, word_list)

