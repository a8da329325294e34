"""WAV files in and out, conversion to the 16 kHz mono PCM16 the client sends, and the timing
of audio: the real-time send schedule, an energy-based speech-segment finder, and the
matching of speech ends to replies that `voicemesh talk` reports as latency."""
from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

SEND_RATE_HZ = 16000


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an integer-PCM WAV (8, 16, 24 or 32 bit, any channel count) as float32 mono in [-1, 1].

    Channels are averaged. Returns (samples, sample_rate_hz).
    """
    try:
        with wave.open(str(path), "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except wave.Error as err:
        raise ValueError(
            f"{path}: not a readable integer-PCM WAV ({err}); convert it first, "
            f"e.g. `ffmpeg -i IN -ac 1 -ar 16000 -c:a pcm_s16le OUT.wav`"
        ) from None
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        bytes3 = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = bytes3[:, 0] | (bytes3[:, 1] << 8) | (bytes3[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)  # sign-extend 24-bit
        samples = ints.astype(np.float32) / float(1 << 23)
    elif width == 4:
        samples = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    else:
        raise ValueError(f"{path}: unsupported sample width of {width} bytes")
    if channels > 1:
        samples = samples[: len(samples) - len(samples) % channels].reshape(-1, channels).mean(axis=1)
    return np.ascontiguousarray(samples, dtype=np.float32), rate


def to_pcm16(samples: np.ndarray, rate_hz: int, target_rate_hz: int = SEND_RATE_HZ) -> np.ndarray:
    """Resample float mono audio (soxr, high quality) and convert to int16 with clipping."""
    if rate_hz != target_rate_hz:
        samples = soxr.resample(samples, rate_hz, target_rate_hz, quality="HQ")
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


def load_for_sending(path: str | Path) -> np.ndarray:
    """Any supported WAV -> 16 kHz mono int16, ready to stream."""
    samples, rate = read_wav(path)
    return to_pcm16(samples, rate)


def write_wav(path: str | Path, pcm16: bytes | np.ndarray, rate_hz: int) -> None:
    """Write mono PCM16 (bytes or int16 array) as a WAV file."""
    data = pcm16.astype("<i2").tobytes() if isinstance(pcm16, np.ndarray) else bytes(pcm16)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate_hz)
        wav.writeframes(data)


def send_time(start: float, index: int, chunk_seconds: float) -> float:
    """When chunk `index` leaves: like a microphone, once its last sample has been "recorded".

    Computed from the start every time (never accumulated), so thousands of chunks later the
    schedule is still exact and any lateness of one send does not shift the ones after it.
    """
    return start + (index + 1) * chunk_seconds


def chunk_send_times(count: int, chunk_seconds: float, start: float = 0.0) -> list[float]:
    return [send_time(start, k, chunk_seconds) for k in range(count)]


def assign_latencies(segment_ends: list[float], first_audio: dict[int, float]) -> dict[int, float]:
    """Turn number -> ms from the end of user speech to the first audio of that turn's reply.

    Each segment is answered by the turn whose first audio arrives first at or after the
    segment's end. When several segments map to one turn (the server heard one utterance
    with a pause in it), the last one wins: the reply can only start after the user stopped.
    """
    latencies: dict[int, float] = {}
    replies = sorted((t, turn) for turn, t in first_audio.items())
    for end in segment_ends:
        reply = next(((t, turn) for t, turn in replies if t >= end), None)
        if reply is not None:
            latencies[reply[1]] = (reply[0] - end) * 1000.0
    return latencies


@dataclass(frozen=True)
class Segment:
    """A stretch of speech in the input, in samples [start, end) at `rate_hz`."""

    start: int
    end: int
    rate_hz: int

    @property
    def start_ms(self) -> float:
        return 1000.0 * self.start / self.rate_hz

    @property
    def end_ms(self) -> float:
        return 1000.0 * self.end / self.rate_hz


def speech_segments(
    samples: np.ndarray,
    rate_hz: int,
    frame_ms: float = 20.0,
    threshold_db: float = -40.0,
    merge_gap_ms: float = 300.0,
    min_speech_ms: float = 60.0,
    floor_dbfs: float = -70.0,
) -> list[Segment]:
    """Find speech by frame energy: a frame is speech when its RMS is within `threshold_db`
    of the loudest frame (and above an absolute floor, so digital silence never counts).

    Runs separated by less than `merge_gap_ms` are one segment (pauses between words), and
    runs shorter than `min_speech_ms` are dropped (clicks). Works on int16 or float input.
    """
    scale = 32768.0 if samples.dtype == np.int16 else 1.0
    frame = max(1, int(round(rate_hz * frame_ms / 1000.0)))
    count = len(samples) // frame
    if count == 0:
        return []
    frames = samples[: count * frame].astype(np.float64).reshape(count, frame) / scale
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    peak = float(rms.max())
    threshold = max(peak * 10 ** (threshold_db / 20.0), 10 ** (floor_dbfs / 20.0))
    voiced = rms >= threshold
    if not voiced.any():
        return []
    # Edges of the voiced runs, as frame indices: starts where 0->1, ends where 1->0.
    padded = np.concatenate(([False], voiced, [False])).astype(np.int8)
    edges = np.diff(padded)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    merge_frames = merge_gap_ms / frame_ms
    runs: list[list[int]] = []
    for start, end in zip(starts.tolist(), ends.tolist(), strict=False):
        if runs and start - runs[-1][1] < merge_frames:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    min_frames = min_speech_ms / frame_ms
    return [
        Segment(start * frame, min(end * frame, len(samples)), rate_hz)
        for start, end in runs
        if end - start >= min_frames
    ]
