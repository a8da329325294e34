"""Caller audio on its way to the session-long VAD and STT streams.

Every message costs 25-45 µs of CPU on each side of a hop, so audio is batched; but the
frame that completes the user's pause decides the end of the turn, and any wait before it
reaches the VAD adds to the reply's latency. So each stream gets the piece size it needs:

- VAD: VAD_PIECE_MS pieces (the onset of speech waits half a piece on average), except
  that while the user is speaking, once the quiet run is within URGENT_MARGIN_MS of the
  stop wait, each quiet frame leaves at once and urgent, with whatever waits before it: it
  may be the one that completes the stop wait (a loud one cannot). The other pieces are
  not urgent: on a multiplexed call (orchestrator.mux) they may wait a few milliseconds
  to share a write with other sessions' audio. (The VAD still decides; loudness only
  picks the batching. Under a noise floor above QUIET_RMS, or when the VAD hears the
  pause begin before the audio turns quiet, the stop is at most one piece later, plus the
  multiplexed call's linger.)
- STT: STT_SPEECH_MS pieces while the user is speaking, STT_IDLE_MS otherwise (the STT
  only keeps that audio as the next turn's pre-roll). Before a turn start everything is
  flushed, and before a Finalize whatever may still hold speech, so the transcripts cover
  every word the VAD has heard.
"""
from __future__ import annotations

import bisect
import time

import numpy as np

from voicemesh.v1 import common_pb2, stt_pb2, vad_pb2

VAD_PIECE_MS = 40
STT_SPEECH_MS = 100
STT_IDLE_MS = 500
URGENT_MARGIN_MS = 100  # quiet frames are urgent from this long before the stop wait ends
QUIET_RMS = 300.0  # int16 RMS of a 20 ms frame (about -40 dBFS) below which it may be the pause
ARRIVALS_KEPT = 4000  # (offset, time) pairs: about a minute of 20 ms frames, plenty to time a turn


def _quiet(samples: np.ndarray) -> bool:
    as_float = samples.astype(np.float32)
    return float(np.dot(as_float, as_float)) < QUIET_RMS * QUIET_RMS * len(samples)


class _Outlet:
    """One stream's pending samples and how far it has been fed."""

    def __init__(self, call, wrap, rate_hz: int):
        self.call, self.wrap, self.rate_hz = call, wrap, rate_hz
        self.pending: list[np.ndarray] = []
        self.pending_samples = 0
        self.sent_samples = 0

    def add(self, samples: np.ndarray) -> None:
        self.pending.append(samples)
        self.pending_samples += len(samples)

    def holds_ms(self) -> float:
        return self.pending_samples * 1000 / self.rate_hz

    async def flush(self, urgent: bool = True) -> None:
        if not self.pending_samples:
            return
        data = b"".join(self.pending)  # one copy: the arrays are joined through their buffers
        offset_ms = self.sent_samples * 1000 // self.rate_hz
        self.sent_samples += self.pending_samples
        self.pending, self.pending_samples = [], 0
        await self.call.write(self.wrap(common_pb2.AudioChunk(data=data, offset_ms=offset_ms)), urgent=urgent)


class CallerAudio:
    """Feeds one session's VAD and STT calls; remembers when each piece of audio arrived."""

    def __init__(self, vad_call, stt_call, rate_hz: int, stop_ms: int = 200):
        """`stop_ms`: the VAD's stop wait, or the least it can be (unset, the VAD picks 200 ms or more)."""
        self.rate_hz = rate_hz
        self.urgent_after_ms = max(0, stop_ms - URGENT_MARGIN_MS)
        self.quiet_run_ms = 0.0  # quiet audio since the user's last loud frame
        self.vad = _Outlet(vad_call, lambda chunk: vad_pb2.DetectRequest(audio=chunk), rate_hz)
        self.stt = _Outlet(stt_call, lambda chunk: stt_pb2.RecognizeRequest(audio=chunk), rate_hz)
        self.received_samples = 0
        self._arrivals: list[tuple[int, float]] = []  # (end offset in samples, arrival time)

    @property
    def received_ms(self) -> int:
        return self.received_samples * 1000 // self.rate_hz

    async def push(self, samples: np.ndarray, user_speaking: bool) -> None:
        """One piece of caller audio (int16 at rate_hz, silence already swapped in when muted)."""
        if not len(samples):
            return
        self.received_samples += len(samples)
        self._arrivals.append((self.received_samples, time.monotonic()))
        if len(self._arrivals) > ARRIVALS_KEPT:
            del self._arrivals[: ARRIVALS_KEPT // 2]
        samples = samples.astype("<i2", copy=False)
        self.vad.add(samples)
        self.stt.add(samples)
        quiet = user_speaking and _quiet(samples)
        self.quiet_run_ms = self.quiet_run_ms + len(samples) * 1000 / self.rate_hz if quiet else 0.0
        if quiet and self.quiet_run_ms >= self.urgent_after_ms:
            await self.vad.flush()  # urgent: it may complete the pause
        elif self.vad.holds_ms() >= VAD_PIECE_MS:
            await self.vad.flush(urgent=False)
        if self.stt.holds_ms() >= (STT_SPEECH_MS if user_speaking else STT_IDLE_MS):
            await self.stt.flush()

    async def flush_stt(self, speech_end_ms: int | None = None) -> None:
        """Before a turn start (everything) or a Finalize (the speech up to `speech_end_ms`):
        the STT must have heard it. Only silence after the speech still waiting costs no write."""
        if speech_end_ms is None or self.stt.sent_samples < speech_end_ms * self.rate_hz // 1000:
            await self.stt.flush()

    async def flush(self) -> None:
        await self.vad.flush()
        await self.stt.flush()

    def arrival_time(self, offset_ms: int) -> float:
        """When the audio at stream offset `offset_ms` reached the orchestrator."""
        sample = offset_ms * self.rate_hz // 1000
        index = bisect.bisect_left(self._arrivals, (sample, 0.0))
        if index >= len(self._arrivals):
            return time.monotonic()
        return self._arrivals[index][1]
