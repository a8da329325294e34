"""Embedded Whisper STT: faster-whisper (CTranslate2), int8 on the CPU.

Whisper is not a streaming model. Streaming is built on top: a stream keeps the last 30 s of
audio; the open utterance (turn_start .. finalize) is re-decoded as it grows for interim
results, at each pause, and once more at finalize for the final one (unless the pause decode
already covers it).

Each decode runs on an encoder window cut to the utterance (whisper_window.py) rather than
faster-whisper's fixed 30 s one: one decode of a 2-3 s question takes ~0.1 s instead of ~0.6 s
on 2 cores; one that loops there is decoded again on the 30 s window. It is one greedy pass
without timestamp tokens, words aligned from the cross-attention; Whisper's no-speech rule is
applied here.

An optional second, smaller model (`interim_model`, e.g. tiny.en) can take the periodic
interim decodes: captions cost less CPU and hold the worker for less time, so the pause
decode, which becomes the final, starts sooner. Pause decodes and finals stay on the main
model, so a pause transcript (which the orchestrator speculates on) is the final's text.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from voicemesh.runtime.config import env_value
from voicemesh.runtime.cpu import EngineCpu, engine_threads, set_omp_wait_policy, wait_policy
from voicemesh.runtime.models import model_path, package_file
from voicemesh.stt.models import INTERIM_MODELS, WHISPER_BASE
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.stt.providers.base import SttProvider, SttStream, SttStreamConfig, Word
from voicemesh.stt.providers.decode_queue import DecodeJob, DecodeQueue
from voicemesh.stt.providers.whisper_stream import (
    INTERIM_EVERY_MS, LOG_PROB_FLOOR, NO_SPEECH_PROB, PAUSE_MS, QUIET_FLOOR_RMS, QUIET_FRAME_MS, WHISPER_RATE_HZ,
    WhisperSttStream, _Decoded, frame_rms,
)
from voicemesh.stt.providers.whisper_window import WINDOWS, WindowedWhisper

log = logging.getLogger(__name__)
DEFAULT_THREADS = 2  # at most; fewer when the process has fewer CPUs (runtime/cpu.py)
DEFAULT_LANGUAGE = "en"
DEFAULT_COMPUTE_TYPE = "int8"  # measured faster than float32 on 2 CPU cores (docs/stt-levers.md)
COMPUTE_TYPES = ("int8", "int8_float32", "float32")


def _whisper_language(bcp47: str) -> str:
    return bcp47.split("-")[0].lower()  # Whisper names languages by ISO 639-1: "en-US" -> "en"


def _flag(name: str, default: str) -> bool:
    return env_value("stt", name, default).lower() not in ("0", "false", "no", "off")


def _whole_number(name: str, given: int | None, default: int, low: int, high: int, unit: str = "") -> int:
    """`given`, else VOICEMESH_STT_<NAME>, else `default`: a whole number from `low` to `high`."""
    raw = str(given) if given is not None else env_value("stt", name, str(default))
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ValueError(f"VOICEMESH_STT_{name.upper()}: {raw!r} is not a whole number{unit} from {low} to {high}")
    return int(raw)


def _loudest_frame_rms(audio: np.ndarray) -> float:
    """RMS of the loudest QUIET_FRAME_MS frame of float audio (full scale 1.0)."""
    return float(frame_rms(audio, min(len(audio), WHISPER_RATE_HZ * QUIET_FRAME_MS // 1000)).max())


def interim_model_dir(choice: str) -> Path | None:
    """The interim model's folder: "auto" (tiny.en where its wheel is installed, else none),
    "none" or "" (captions on the main model), a packaged model's name, or a folder."""
    if choice in ("", "none"):
        return None
    if choice == "auto":
        source = INTERIM_MODELS["tiny.en"]
        return package_file(source).parent if importlib.util.find_spec(source.package) else None
    if choice in INTERIM_MODELS:
        return package_file(INTERIM_MODELS[choice]).parent  # says which package to install
    return Path(choice)


class WhisperSttProvider(SttProvider):
    """Whisper via faster-whisper. model_dir: a CTranslate2 Whisper folder (default: the
    embedded whisper-base, env VOICEMESH_STT_MODEL_DIR); cpu_threads: CTranslate2 intra-op
    threads (env VOICEMESH_STT_THREADS, else 2, or the CPUs available if fewer); language:
    default when a stream names none (env VOICEMESH_STT_LANGUAGE, else "en"); word_timestamps:
    word times on finals (env VOICEMESH_STT_WORD_TIMESTAMPS, default on; off saves ~5-15% of
    the final decode); compute_type: CTranslate2's (env VOICEMESH_STT_COMPUTE_TYPE, default
    int8); beam_size: for finals and pause decodes (env VOICEMESH_STT_BEAM_SIZE, default 1,
    greedy); interim_model: a second model for periodic interims (env
    VOICEMESH_STT_INTERIM_MODEL: "auto", the default, for tiny.en where its wheel is installed;
    "tiny.en"; "none"; or a model folder); window: the encoder window (env VOICEMESH_STT_WINDOW:
    "fit", the default, cut to the audio; "full", faster-whisper's 30 s, kept to measure against).

    All decodes, from every stream, run one at a time on one dedicated thread: the model
    already uses `cpu_threads` cores, and parallel decodes would only slow each other down.
    Finals go first, and interims nobody needs any more are dropped unrun (decode_queue.py).
    """

    name = "whisper"

    def __init__(
        self, model_dir: str | os.PathLike | None = None, cpu_threads: int | None = None,
        language: str | None = None, word_timestamps: bool | None = None,
        compute_type: str | None = None, beam_size: int | None = None, interim_model: str | None = None,
        window: str | None = None, pause_ms: int | None = None,
    ) -> None:
        self._model_dir = Path(model_dir) if model_dir else None
        self._cpu = EngineCpu(engine_threads("stt", DEFAULT_THREADS, cpu_threads), wait_policy())
        self.cpu_threads = self._cpu.threads.threads
        self.language = _whisper_language(language or env_value("stt", "language", DEFAULT_LANGUAGE))
        self.word_timestamps = _flag("word_timestamps", "1") if word_timestamps is None else word_timestamps
        self.compute_type = compute_type or env_value("stt", "compute_type", DEFAULT_COMPUTE_TYPE)
        if self.compute_type not in COMPUTE_TYPES:
            raise ValueError(f"VOICEMESH_STT_COMPUTE_TYPE: {self.compute_type!r} is not one of {', '.join(COMPUTE_TYPES)}")
        self.beam_size = _whole_number("beam_size", beam_size, 1, 1, 10)
        self.interim_model = env_value("stt", "interim_model", "auto") if interim_model is None else interim_model
        self.window = window or env_value("stt", "window", "fit")
        if self.window not in WINDOWS:
            raise ValueError(f"VOICEMESH_STT_WINDOW: {self.window!r} is not one of {', '.join(WINDOWS)}")
        # Quiet audio that starts a pause decode (whisper_stream.PAUSE_MS).
        self.pause_ms = _whole_number("pause_ms", pause_ms, PAUSE_MS, 40, 2000, unit=" of ms")
        self._queue = DecodeQueue("whisper")
        self._pipeline: WindowedWhisper | None = None  # the main model, once loaded
        self._interim_pipeline: WindowedWhisper | None = None  # the interim model's, when there is one
        self._interim_dir: Path | None = None

    async def load(self) -> None:
        if self._model_dir is None:
            self._model_dir = model_path(WHISPER_BASE)
        # faster-whisper treats a missing folder as a Hub repo id and would try to download it.
        self._interim_dir = interim_model_dir(self.interim_model)
        for folder in (self._model_dir, self._interim_dir):
            if folder is not None and not (folder / "model.bin").exists():
                raise FileNotFoundError(f"no Whisper model (model.bin) in {folder}")
        await self._queue.submit(self._load_sync, final=True).future

    def interim_model_covers(self, language: str) -> bool:
        """Whether captions in `language` go to the interim model (an English-only one, such as
        tiny.en, takes English alone; other languages stay on the main model)."""
        pipeline = self._interim_pipeline
        return pipeline is not None and (pipeline.is_multilingual or language == "en")

    def _load_sync(self) -> None:
        # CTranslate2's OpenMP (its own libgomp) reads the wait policy when it loads: set it first.
        self._cpu = EngineCpu(self._cpu.threads, set_omp_wait_policy("ctranslate2"))
        from faster_whisper import WhisperModel

        started = time.perf_counter()
        def pipeline(folder: Path) -> WindowedWhisper:
            return WindowedWhisper(WhisperModel(
                str(folder), device="cpu", compute_type=self.compute_type,
                cpu_threads=self.cpu_threads, num_workers=1, local_files_only=True,
            ), self.window)

        self._pipeline = pipeline(self._model_dir)
        self._interim_pipeline = pipeline(self._interim_dir) if self._interim_dir else None
        # Warm-up: the first decode allocates its buffers (measured ~25% slower than the next).
        noise = np.random.default_rng(0).normal(0.0, 0.01, WHISPER_RATE_HZ).astype(np.float32)
        self.decode(noise, self.language, self.word_timestamps)
        if self._interim_pipeline is not None:
            self.decode(noise, self.language, False, interim=True)
        log.info("whisper loaded from %s%s in %.2f s: %s", self._model_dir,
                 f" (interims: {self._interim_dir})" if self._interim_dir else "",
                 time.perf_counter() - started, self._cpu.describe())

    def info(self) -> ProviderInfo:
        return ProviderInfo(
            provider=self.name,
            model=self._model_dir.name if self._model_dir else "whisper-base",
            sample_rates_hz=(WHISPER_RATE_HZ,),
            details={
                "compute_type": self.compute_type, "beam_size": str(self.beam_size), "window": self.window,
                "interim_model": self.interim_model, "interim_model_dir": str(self._interim_dir or ""),
                "cpu_threads": str(self.cpu_threads), **self._cpu.details(),
                "language": self.language,
                "word_timestamps": str(self.word_timestamps).lower(), "interim_every_ms": str(INTERIM_EVERY_MS),
                "pause_ms": str(self.pause_ms),
            },
        )

    def open_stream(self, config: SttStreamConfig) -> SttStream:
        if self._pipeline is None:
            raise RuntimeError("WhisperSttProvider.open_stream() before load()")
        return WhisperSttStream(self, config, _whisper_language(config.language or self.language))

    async def close(self) -> None:
        self._queue.close()  # what is queued is dropped; a running decode finishes on its thread
        self._pipeline = self._interim_pipeline = None

    @property
    def queue(self) -> DecodeQueue:
        return self._queue

    def submit_decode(
        self, audio: np.ndarray, language: str, words: bool, offset_ms: int, final: bool, key: object,
        interim: bool = False,
    ) -> DecodeJob:
        """Queue a decode (see decode_queue.py); `key` is the stream, so a newer interim of
        the same stream replaces a queued one. `interim`: on the interim model, if there is one."""
        return self._queue.submit(self.decode, audio, language, words, offset_ms, interim, final=final, key=key)

    async def decode_async(self, audio: np.ndarray, language: str, words: bool, offset_ms: int = 0) -> _Decoded:
        """One decode, queued as a final (ahead of interims)."""
        return await self._queue.submit(self.decode, audio, language, words, offset_ms, final=True).future

    def decode(
        self, audio: np.ndarray, language: str, words: bool, offset_ms: int = 0, interim: bool = False,
    ) -> _Decoded:
        """Blocking, on the executor: float32 16 kHz mono audio (under 30 s) -> text.
        Word times are `offset_ms` (where the audio starts in the stream) plus their time in it.
        `interim`: a caption nobody reuses: on the interim model (if any), greedy."""
        if audio.size == 0 or _loudest_frame_rms(audio) < QUIET_FLOOR_RMS / 32768:
            return _Decoded("", 0.0, ())  # nothing above the quiet floor: Whisper would hear "you"
        pipeline = (self._interim_pipeline if interim else None) or self._pipeline
        result = pipeline.decode(audio, language, 1 if interim else self.beam_size, words, fall_back=not interim)
        if result.no_speech_prob > NO_SPEECH_PROB and result.avg_logprob < LOG_PROB_FLOOR:
            return _Decoded("", 0.0, ())  # Whisper's no-speech rule: silence decodes to "you"
        word_list = tuple(
            Word(text.strip(), offset_ms + round(start * 1000), offset_ms + round(end * 1000), probability)
            for text, start, end, probability in result.words
        )
        confidence = math.exp(result.avg_logprob) if result.text else 0.0
        return _Decoded(result.text, confidence, word_list)
