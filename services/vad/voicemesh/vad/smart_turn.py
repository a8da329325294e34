"""Smart Turn v3: does this pause end the user's turn? (an end-of-turn probability from audio)

Smart Turn v3.2 (pipecat-ai, BSD-2-Clause) is a Whisper-tiny encoder with a linear head,
int8-quantised to 8 MB of ONNX. It judges prosody and phrasing, not words: a falling
"...Paris?" scores high, a trailing "and then, uh" scores low. It takes the log-mel
spectrogram of exactly 8 s of 16 kHz audio, the speech right-aligned (zero-padded at the
start), and returns a sigmoid probability. One call costs ~30 ms on one core.

The features are Whisper's, computed here with numpy: the waveform normalised to zero mean
and unit variance, a centred STFT (400-sample periodic Hann window, hop 160, reflect-padded),
the power spectrum projected onto 80 Slaney mel bands, log10 with a 1e-10 floor, clamped to
8 (i.e. 80 dB) below the maximum, then (x + 4) / 4. The last STFT frame is dropped: 800 frames.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from voicemesh.runtime.cpu import EngineCpu, engine_threads, onnx_session_options, wait_policy
from voicemesh.runtime.models import model_path
from voicemesh.vad.models import SMART_TURN
from voicemesh.vad.segmenter import EventKind, SpeechEvent, SpeechSegmenter

log = logging.getLogger(__name__)

RATE_HZ = 16000
WINDOW_SECS = 8
WINDOW_SAMPLES = WINDOW_SECS * RATE_HZ
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 80
FRAMES = WINDOW_SAMPLES // HOP  # 800
MODEL_NAME = "smart-turn-v3.2-cpu"
Scorer = Callable[[np.ndarray], Awaitable[float]]  # int16 16 kHz audio -> end-of-turn probability


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    log_step = np.log(6.4) / 27.0  # 1 kHz -> 15 mel, each mel above is this much in ln(Hz)
    return np.where(hz < 1000.0, hz * 3.0 / 200.0, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / log_step)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp((mel - 15.0) * log_step))


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, rate_hz: int = RATE_HZ) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters, evenly spaced in mel, each of unit area
    (Slaney normalisation: height 2 / bandwidth in Hz)."""
    bin_hz = np.fft.rfftfreq(n_fft, 1.0 / rate_hz)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(rate_hz / 2.0), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bin_hz - lower) / (centre - lower)
    falling = (upper - bin_hz) / (upper - centre)
    triangles = np.clip(np.minimum(rising, falling), 0.0, None)
    return triangles * (2.0 / (upper - lower))


_FILTERS = mel_filterbank()
_HANN = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic, as torch's


def fit_window(audio: np.ndarray) -> np.ndarray:
    """The last 8 s of `audio` as float32 in [-1, 1], zero-padded at the start when shorter."""
    audio = np.asarray(audio).reshape(-1)
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / 32768.0
    audio = audio[-WINDOW_SAMPLES:].astype(np.float32, copy=False)
    out = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
    out[WINDOW_SAMPLES - len(audio):] = audio
    return out


def log_mel_features(audio: np.ndarray) -> np.ndarray:
    """Whisper log-mel features (N_MELS, FRAMES) float32 of one 8 s window (see fit_window)."""
    if audio.shape != (WINDOW_SAMPLES,):
        raise ValueError(f"expected {WINDOW_SAMPLES} samples, got shape {audio.shape}")
    x = audio.astype(np.float64)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    frames = sliding_window_view(padded, N_FFT)[::HOP][:FRAMES]  # the trailing frame is unused
    spectrum = np.fft.rfft(frames * _HANN, axis=1)
    power = spectrum.real**2 + spectrum.imag**2
    log_mel = np.log10(np.maximum(power @ _FILTERS.T, 1e-10)).T
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return ((log_mel + 4.0) / 4.0).astype(np.float32)


def find_model() -> Path | None:
    """The Smart Turn ONNX file (VOICEMESH_SMART_TURN_MODEL, else the one in the pipecat-ai
    wheel), or None when it is not installed."""
    try:
        path = model_path(SMART_TURN)
    except FileNotFoundError as exc:
        log.warning("Smart Turn is unavailable: %s", exc)
        return None
    if not path.is_file():
        log.warning("Smart Turn is unavailable: %s does not exist", path)
        return None
    return path


class SmartTurnModel:
    """One ONNX session and one worker thread per process, shared by every stream.

    A dedicated thread keeps the ~30 ms inference off the event loop and off the VAD
    provider's thread, so Silero windows of other streams never wait behind it.
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = path
        # One thread unless VOICEMESH_SMART_TURN_THREADS says otherwise: ~30 ms per call, and
        # the Silero windows of other streams need the other core meanwhile.
        self.cpu = EngineCpu(engine_threads("vad", 1, threads, name="smart_turn_threads"), wait_policy())
        self._session = None
        self._input = "input_features"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smart-turn")

    @classmethod
    async def load_if_available(cls) -> SmartTurnModel | None:
        path = find_model()
        if path is None:
            return None
        model = cls(path)
        await model.load()
        return model

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load_blocking)

    def _load_blocking(self) -> None:
        import onnxruntime as ort

        options = onnx_session_options(ort, self.cpu)
        session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [N_MELS, FRAMES] or len(outputs) != 1:
            described = [(i.name, i.shape) for i in inputs] + [(o.name, o.shape) for o in outputs]
            raise RuntimeError(f"{self.path} does not look like Smart Turn v3: {described}")
        self._input = inputs[0].name
        self._session = session
        started = time.perf_counter()
        for _ in range(2):  # the first runs allocate and pick kernels
            self.score_blocking(np.zeros(WINDOW_SAMPLES, dtype=np.float32))
        log.info("Smart Turn loaded from %s (warm-up %.0f ms): %s",
                 self.path, (time.perf_counter() - started) * 1000, self.cpu.describe())

    def score_blocking(self, audio: np.ndarray) -> float:
        """End-of-turn probability (0-1) of the audio's last 8 s (int16 or float [-1, 1])."""
        if self._session is None:
            raise RuntimeError("SmartTurnModel.load() must complete before scoring")
        started = time.perf_counter()
        features = log_mel_features(fit_window(audio))[None]
        (output,) = self._session.run(None, {self._input: features})
        probability = float(np.clip(output.reshape(-1)[0], 0.0, 1.0))
        log.debug("end of turn %.3f in %.1f ms", probability, (time.perf_counter() - started) * 1000)
        return probability

    async def score(self, audio: np.ndarray) -> float:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.score_blocking, audio)

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._session = None


class AudioHistory:
    """The most recent `keep_samples` of one stream's 16 kHz audio, addressed by stream offset."""

    def __init__(self, keep_samples: int = WINDOW_SAMPLES) -> None:
        self._keep = keep_samples
        self._audio = np.zeros(0, dtype=np.int16)
        self._end = 0  # stream offset (samples) just after the last sample held

    def append(self, samples: np.ndarray) -> None:
        self._end += len(samples)
        self._audio = np.concatenate((self._audio, samples))
        if len(self._audio) > 2 * self._keep:  # trim rarely: amortised O(1) per sample
            self._audio = self._audio[-self._keep:]

    def slice(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end) of the stream, clipped to what is still held."""
        first = self._end - len(self._audio)
        start, end = max(start, first), min(end, self._end)
        if end <= start:
            return np.zeros(0, dtype=np.int16)
        return self._audio[start - first : end - first]


class TurnGate:
    """One stream's segmenter, with each proposed stop put to `scorer` (None: plain stop_secs).

    The scorer hears the stream's last 8 s up to the moment the stop is proposed, so the
    stop_secs of silence after the speech are included, as in Pipecat's analyzer. Earlier
    audio is kept even when it belongs to a segment already ended: an early stop at a
    mid-sentence pause must not rob the next pause of the sentence's beginning.
    """

    def __init__(self, segmenter: SpeechSegmenter, scorer: Scorer | None) -> None:
        self.segmenter = segmenter
        self._scorer = scorer
        self._history = AudioHistory() if scorer is not None else None

    def append(self, samples: np.ndarray) -> None:
        """Every sample of the stream, in order, before the windows that cover it are pushed."""
        if self._history is not None:
            self._history.append(samples)

    async def push(self, window_end_samples: int, probability: float, volume: float) -> list[SpeechEvent]:
        events = self.segmenter.push(window_end_samples, probability, volume)
        if self._scorer is None or not events or events[-1].kind is not EventKind.STOP_CANDIDATE:
            return events
        audio = self._history.slice(window_end_samples - WINDOW_SAMPLES, window_end_samples)
        end_of_turn = await self._scorer(audio)
        return self.segmenter.resolve_stop(end_of_turn)
