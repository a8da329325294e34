"""hibari: a 7.9 MB English TTS model distilled from Kokoro, run with onnxruntime on the CPU.

The network is not autoregressive: it turns one sentence's phonemes into a whole spectrum in
a single pass, so the smallest unit of audio it can produce is a sentence (or a clause, for
sentences over hibari's phoneme limit). We therefore stream per sentence: each one is
synthesized in the executor, the next one is started before the current one is handed out,
and audio leaves in ~100 ms chunks so the transport can pace and interrupt it.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from voicemesh.runtime.cpu import EngineCpu, engine_threads, onnx_session_options, wait_policy
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.tts.providers.base import SynthesisRequest, TtsProvider

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 24_000
DEFAULT_VOICE = "heart"
DEFAULT_THREADS = 2  # at most; fewer when the process has fewer CPUs (runtime/cpu.py)
MIN_SPEED, MAX_SPEED = 0.5, 2.0  # the range hibari documents for its duration predictor


def installed_voices() -> list[str]:
    """Voices whose model file is on disk: the bundled one plus any in hibari's cache.

    hibari downloads missing voices on first use; we never do (no network at run time), so
    only voices already present count as available.
    """
    from hibari.voices import VOICES, voice_path

    available = []
    for name in VOICES:
        try:
            voice_path(name, download_missing=False)
        except FileNotFoundError:
            continue
        available.append(name)
    return available


def _to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class HibariTtsProvider(TtsProvider):
    """hibari TTS. voice: default voice (env VOICEMESH_TTS_VOICE, else "heart"); threads:
    onnxruntime intra-op threads (env VOICEMESH_TTS_THREADS, else 2, or the CPUs available if
    fewer); its threads never spin (OMP_WAIT_POLICY=ACTIVE lets them); chunk_ms: audio chunk size.
    English only: request.language is not checked, the voice decides the accent.
    """

    name = "hibari"
    sample_rate_hz = SAMPLE_RATE_HZ

    def __init__(self, voice: str | None = None, threads: int | None = None, chunk_ms: int = 100) -> None:
        self.default_voice = voice or os.environ.get("VOICEMESH_TTS_VOICE") or DEFAULT_VOICE
        self._cpu = EngineCpu(engine_threads("tts", DEFAULT_THREADS, threads), wait_policy())
        self.threads = self._cpu.threads.threads
        self.chunk_bytes = 2 * SAMPLE_RATE_HZ * chunk_ms // 1000
        # One worker: hibari's G2P is plain Python state and onnxruntime already uses
        # `threads` cores per run; concurrent streams queue rather than oversubscribe.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hibari")
        self._engines: dict[str, object] = {}  # voice -> hibari.Hibari, touched only in the executor
        self._voices: list[str] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def load(self) -> None:
        self._voices = installed_voices()
        self._check_voice(self.default_voice)
        await self._run(self._warm_up)

    def _warm_up(self) -> None:
        # The first call loads the G2P lexicons (~0.2 s) and lets onnxruntime size its buffers.
        engine = self._engine(self.default_voice)
        engine("Warm up.")
        log.info("hibari ready: voice %s, %s", self.default_voice, self._cpu.describe())

    def info(self) -> ProviderInfo:
        import hibari

        return ProviderInfo(
            provider=self.name,
            model=f"hibari-{hibari.__version__}",
            sample_rates_hz=(SAMPLE_RATE_HZ,),
            details={
                "voice": self.default_voice,
                "voices": ",".join(self.voices()),
                **self._cpu.details(),
            },
        )

    def voices(self) -> list[str]:
        if self._voices is None:
            self._voices = installed_voices()
        return list(self._voices)

    async def close(self) -> None:
        # Waits for a running phrase; off the loop so other tasks keep going meanwhile.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._engines.clear()

    # -- synthesis ------------------------------------------------------------------------

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[bytes]:
        voice = request.voice or self.default_voice
        self._check_voice(voice)
        speed = request.speed or 1.0
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise ValueError(f"speed {speed} is outside [{MIN_SPEED}, {MAX_SPEED}]")
        if not request.text.strip():
            return

        # Each phoneme chunk is one network run; the RNG keeps the noise branch varied but
        # shared across the request, like hibari's own stream().
        rng = np.random.default_rng()
        phrases: list[str] = await self._run(self._phonemize, voice, request.text)
        loop = asyncio.get_running_loop()

        def start(phrase: str) -> asyncio.Future[bytes]:
            return loop.run_in_executor(self._executor, self._render, voice, phrase, speed, rng)

        pending = start(phrases[0]) if phrases else None
        try:
            for index in range(len(phrases)):
                pcm = await pending
                # Start the next phrase before handing this one out, so it is ready in time.
                pending = start(phrases[index + 1]) if index + 1 < len(phrases) else None
                for offset in range(0, len(pcm), self.chunk_bytes):
                    yield pcm[offset : offset + self.chunk_bytes]
        finally:
            if pending is not None:
                pending.cancel()  # drops it if still queued; a running phrase just finishes

    # -- executor side --------------------------------------------------------------------

    def _engine(self, voice: str):
        engine = self._engines.get(voice)
        if engine is None:
            from hibari import Hibari
            from hibari.voices import VOICES

            # Voices of the same accent share one G2P (its lexicons are the slow part to load).
            british = VOICES[voice]["british"]
            same_accent = (e for name, e in self._engines.items() if VOICES[name]["british"] == british)
            g2p = next((e.g2p for e in same_accent), None)
            engine = Hibari(voice=voice, threads=1, g2p=g2p)
            engine.sess = self._session(engine.model_path)
            self._engines[voice] = engine
        return engine

    def _session(self, path: str):
        """hibari builds its session with spinning worker threads and takes no options, so the
        voice's model is opened again with ours (7.9 MB, once per voice)."""
        import onnxruntime as ort

        return ort.InferenceSession(path, onnx_session_options(ort, self._cpu), providers=["CPUExecutionProvider"])

    def _phonemize(self, voice: str, text: str) -> list[str]:
        return self._engine(voice).phonemize(text)

    def _render(self, voice: str, phonemes: str, speed: float, rng: np.random.Generator) -> bytes:
        engine = self._engine(voice)
        return _to_pcm16(engine.from_ids(engine.ids(phonemes), speed, rng))

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _check_voice(self, voice: str) -> None:
        available = self.voices()
        if voice not in available:
            raise ValueError(f"unknown hibari voice {voice!r}; available: {', '.join(available)}")
