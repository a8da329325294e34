"""The caller of the voice-to-voice comparison, the same on both sides (both venvs import it):
20 ms frames of 16 kHz PCM16 at real time, like a microphone (a frame leaves once its last
sample is "recorded", on a schedule computed from the start so lateness never accumulates),
the clip's trailing silence and then zeros until the turn is over or the deadline passes."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import numpy as np

RATE_HZ = 16000
FRAME_MS = 20
FRAME_SAMPLES = RATE_HZ * FRAME_MS // 1000


async def paced_send(samples: np.ndarray, speech_end: int, write: Callable[[bytes], Awaitable[None]],
                     done: asyncio.Event, deadline_s: float,
                     on_speech_end: Callable[[float], None] | None = None) -> float | None:
    """Send until `done` is set or `deadline_s` after the start; returns the monotonic time the
    frame holding the speech's last sample was written (None if it never was), and hands it to
    `on_speech_end` as soon as it is known (a caller that ends the turn on an event needs it then)."""
    end_frame = (speech_end - 1) // FRAME_SAMPLES
    start = time.monotonic()
    speech_end_at, index = None, 0
    while not done.is_set() and time.monotonic() < start + deadline_s:
        data = samples[index * FRAME_SAMPLES : (index + 1) * FRAME_SAMPLES].astype("<i2").tobytes()
        await asyncio.sleep(max(0.0, start + (index + 1) * FRAME_MS / 1000 - time.monotonic()))
        await write(data.ljust(2 * FRAME_SAMPLES, b"\0"))
        if index == end_frame:
            speech_end_at = time.monotonic()
            if on_speech_end is not None:
                on_speech_end(speech_end_at)
        index += 1
    return speech_end_at


def since(moments: list[float], origin: float | None) -> float | None:
    """ms from `origin` to the first moment at or after it."""
    if origin is None:
        return None
    later = [m for m in moments if m >= origin]
    return round((min(later) - origin) * 1000, 1) if later else None
