"""Silero VAD v6 on onnxruntime: one shared session, per-stream recurrent state.

The model scores 512-sample windows of 16 kHz audio. Each call takes 576 samples (the last
64 samples of the previous window as context, then 512 new ones), float32 in [-1, 1], plus
a recurrent state of shape (2, 1, 128) that must be carried from window to window of the
same stream. A window costs well under a millisecond on one core, so all streams share one
session and one worker thread: that keeps the event loop free without oversubscribing the
CPU, and the per-stream state lives in `SileroVadStream`, never in the session.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from voicemesh.runtime.cpu import EngineCpu, engine_threads, onnx_session_options, wait_policy
from voicemesh.runtime.models import model_path
from voicemesh.vad.models import SILERO_VAD
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.vad.providers.base import VadFrameResult, VadProvider, VadStream

log = logging.getLogger(__name__)

WINDOW_SAMPLES = 512
CONTEXT_SAMPLES = 64
STATE_SHAPE = (2, 1, 128)
MODEL_NAME = "silero-vad-v6"
_INT16_SCALE = 1.0 / 32768.0


class SileroVadProvider(VadProvider):
    name = "silero"

    def __init__(self, model_file: str | None = None, threads: int | None = None) -> None:
        self._model_file = model_file  # None: the embedded model (or VOICEMESH_VAD_MODEL)
        # One onnxruntime thread (VOICEMESH_VAD_THREADS overrides): a window is far too small
        # to split, and more threads would only wake each other.
        self._cpu = EngineCpu(engine_threads("vad", 1, threads), wait_policy())
        self._session = None
        self._input_names: tuple[str, str, str] = ("input", "state", "sr")
        self._output_names: tuple[str, str] = ("output", "stateN")
        self._sr = np.array(self.sample_rate_hz, dtype=np.int64)
        # One thread: onnxruntime sessions are thread-safe, but one core per process is the
        # budget, and serialising windows keeps latency flat under load.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="silero-vad")
        # Streams' windows queue here and are scored together: one worker hop and one model
        # call per step for every stream waiting, which costs ~3x less per window than one
        # call each once many sessions are open.
        self._waiting: list[tuple["SileroVadStream", np.ndarray, asyncio.Future]] = []
        self._draining = False

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_blocking)

    def _load_blocking(self) -> None:
        import onnxruntime as ort

        path = self._model_file or str(model_path(SILERO_VAD))
        options = onnx_session_options(ort, self._cpu)
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._input_names, self._output_names = _signature(session, path)
        self._session = session
        # Warm-up: the first runs allocate and pick kernels; keep that off the first stream.
        state = np.zeros(STATE_SHAPE, dtype=np.float32)
        window = np.zeros((1, CONTEXT_SAMPLES + WINDOW_SAMPLES), dtype=np.float32)
        for _ in range(3):
            _, state = self.run_window(window, state)
        log.info("silero vad loaded from %s: %s", path, self._cpu.describe())

    def info(self) -> ProviderInfo:
        return ProviderInfo(
            provider="silero",
            model=MODEL_NAME,
            sample_rates_hz=(self.sample_rate_hz,),
            details={
                "window_samples": str(WINDOW_SAMPLES),
                "context_samples": str(CONTEXT_SAMPLES),
                "runtime": "onnxruntime-cpu",
                **self._cpu.details(),
            },
        )

    def open_stream(self) -> "SileroVadStream":
        if self._session is None:
            raise RuntimeError("SileroVadProvider.load() must complete before open_stream()")
        return SileroVadStream(self)

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._session = None

    # -- inference (worker thread only) -------------------------------------------------
    def run_window(self, window: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        """One model call: window (1, 576) float32 and state (2, 1, 128) -> (probability, state)."""
        audio_name, state_name, sr_name = self._input_names
        probability, new_state = self._session.run(
            self._output_names, {audio_name: window, state_name: state, sr_name: self._sr}
        )
        return float(probability[0, 0]), new_state

    async def run_in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def score(self, stream: "SileroVadStream", audio: np.ndarray) -> list[VadFrameResult]:
        """Score whole windows of one stream, batched with whatever other streams are waiting."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((stream, audio, future))
        if not self._draining:
            self._draining = True
            asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    results = await self.run_in_worker(self._score_batch, [(stream, audio) for stream, audio, _ in batch])
                except Exception as exc:  # noqa: BLE001 - every waiter learns of it
                    results = [exc] * len(batch)
                for (_, _, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue  # its caller went away; the stream state was still advanced
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._draining = False

    def _score_batch(self, batch: list[tuple["SileroVadStream", np.ndarray]]) -> list[list[VadFrameResult]]:
        """Worker thread. Step k scores window k of every stream that has one, in one call.

        A stream's windows depend on each other (recurrent state), so they go step by step;
        across streams they are independent and stack on the batch axis."""
        results: list[list[VadFrameResult]] = [[] for _ in batch]
        steps = max(len(audio) // WINDOW_SAMPLES for _, audio in batch)
        audio_name, state_name, sr_name = self._input_names
        for step in range(steps):
            rows = [i for i, (_, audio) in enumerate(batch) if len(audio) // WINDOW_SAMPLES > step]
            windows = np.empty((len(rows), CONTEXT_SAMPLES + WINDOW_SAMPLES), dtype=np.float32)
            for row, index in enumerate(rows):
                stream, audio = batch[index]
                windows[row, :CONTEXT_SAMPLES] = stream._context
                windows[row, CONTEXT_SAMPLES:] = audio[step * WINDOW_SAMPLES : (step + 1) * WINDOW_SAMPLES]
            states = np.concatenate([batch[index][0]._state for index in rows], axis=1)
            probabilities, new_states = self._session.run(
                self._output_names, {audio_name: windows, state_name: states, sr_name: self._sr}
            )
            for row, index in enumerate(rows):
                stream = batch[index][0]
                stream._state = new_states[:, row : row + 1, :].copy()
                stream._context = windows[row, -CONTEXT_SAMPLES:].copy()
                stream._consumed += WINDOW_SAMPLES
                probability = float(probabilities[row, 0])
                results[index].append(VadFrameResult(end_offset_samples=stream._consumed, probability=probability))
        return results


def _signature(session, path: str) -> tuple[tuple[str, str, str], tuple[str, str]]:
    """Names of (audio, state, sr) and (probability, new state), told apart by rank and type.

    Silero v5/v6 exports call them input/state/sr -> output/stateN; matching on shape keeps
    a re-export with other names working and fails loudly on a different model.
    """
    inputs, outputs = session.get_inputs(), session.get_outputs()
    audio = [i.name for i in inputs if len(i.shape) == 2 and i.type == "tensor(float)"]
    state = [i.name for i in inputs if len(i.shape) == 3 and i.type == "tensor(float)"]
    rate = [i.name for i in inputs if len(i.shape) == 0 and i.type == "tensor(int64)"]
    prob = [o.name for o in outputs if len(o.shape) == 2]
    new_state = [o.name for o in outputs if len(o.shape) == 3]
    if not all(len(names) == 1 for names in (audio, state, rate, prob, new_state)) or len(inputs) != 3:
        described = [(i.name, i.shape, i.type) for i in inputs] + [(o.name, o.shape) for o in outputs]
        raise RuntimeError(f"{path} does not look like Silero VAD v5/v6: {described}")
    return (audio[0], state[0], rate[0]), (prob[0], new_state[0])


class SileroVadStream(VadStream):
    """One session's audio: recurrent state, the 64-sample context, and leftover samples."""

    def __init__(self, provider: SileroVadProvider) -> None:
        self._provider = provider
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)  # samples not yet filling a window
        self._consumed = 0  # stream samples already scored (a multiple of WINDOW_SAMPLES)
        self._lock = asyncio.Lock()  # process() calls of one stream must run in order

    async def process(self, samples: np.ndarray) -> list[VadFrameResult]:
        if samples.dtype != np.int16:
            raise TypeError(f"expected int16 PCM, got {samples.dtype}")
        async with self._lock:
            audio = np.concatenate([self._pending, samples.reshape(-1).astype(np.float32) * _INT16_SCALE])
            whole = len(audio) // WINDOW_SAMPLES * WINDOW_SAMPLES
            self._pending = audio[whole:]
            if whole == 0:
                return []
            # All complete windows of this chunk go to the worker in one hop, batched with
            # the windows of every other stream waiting at the same time.
            return await self._provider.score(self, audio[:whole])

    async def close(self) -> None:
        self._pending = np.zeros(0, dtype=np.float32)
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
