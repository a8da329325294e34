"""Audio formats on the wire: validation, mu-law, channel mixing and resampling.

Everything inside the mesh is PCM16 mono; conversion happens once at each edge. Resampling
uses soxr's streaming resampler so chunk boundaries leave no clicks.
"""
from __future__ import annotations

import numpy as np
import soxr

from voicemesh.runtime.errors import InvalidInput
from voicemesh.v1 import common_pb2

MIN_RATE_HZ = 8000
MAX_RATE_HZ = 48000
# One chunk may carry at most this much audio. Chunks should be 20-100 ms; a bigger one
# means a client bug, and it would stall every stage behind it.
MAX_CHUNK_SECONDS = 1.0

PCM16 = common_pb2.AUDIO_ENCODING_PCM16
MULAW = common_pb2.AUDIO_ENCODING_MULAW


def _mulaw_decode_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.uint8)
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = ((mantissa.astype(np.int32) << 3) + 0x84) << exponent
    values = np.where(sign != 0, 0x84 - magnitude, magnitude - 0x84)
    return values.astype(np.int16)


_MULAW_TO_PCM = _mulaw_decode_table()


def mulaw_to_pcm16(data: bytes) -> np.ndarray:
    return _MULAW_TO_PCM[np.frombuffer(data, dtype=np.uint8)]


_MULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])


def pcm16_to_mulaw(samples: np.ndarray) -> bytes:
    """G.711 mu-law encode on 14-bit magnitudes (bit-exact with the reference coder)."""
    pcm14 = samples.astype(np.int32) >> 2
    mask = np.where(pcm14 < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm14), 8159) + 0x21
    segment = np.searchsorted(_MULAW_SEGMENT_ENDS, magnitude, side="left")
    code = np.where(
        segment >= 8, 0x7F, (np.minimum(segment, 7) << 4) | ((magnitude >> (np.minimum(segment, 7) + 1)) & 0x0F)
    )
    return (code ^ mask).astype(np.uint8).tobytes()


def validate_format(fmt: common_pb2.AudioFormat, what: str, max_channels: int = 1) -> tuple[int, int, int]:
    """Check a format from the wire; returns (encoding, sample_rate_hz, channels)."""
    if fmt.encoding not in (PCM16, MULAW):
        known = fmt.encoding in common_pb2.AudioEncoding.values()
        name = common_pb2.AudioEncoding.Name(fmt.encoding) if known else str(fmt.encoding)
        raise InvalidInput(f"{what}: unsupported encoding {name}; use AUDIO_ENCODING_PCM16 or AUDIO_ENCODING_MULAW")
    if not MIN_RATE_HZ <= fmt.sample_rate_hz <= MAX_RATE_HZ:
        raise InvalidInput(
            f"{what}: sample_rate_hz {fmt.sample_rate_hz} is outside {MIN_RATE_HZ}-{MAX_RATE_HZ} Hz"
        )
    channels = fmt.channels or 1
    if channels > max_channels:
        raise InvalidInput(f"{what}: {channels} channels; at most {max_channels} supported")
    return fmt.encoding, fmt.sample_rate_hz, channels


class InboundAudio:
    """Turns one stream's wire audio into PCM16 mono at `target_rate_hz`, validating each chunk."""

    def __init__(self, fmt: common_pb2.AudioFormat, target_rate_hz: int, what: str, max_channels: int = 1):
        self.encoding, self.rate_hz, self.channels = validate_format(fmt, what, max_channels)
        self.target_rate_hz = target_rate_hz
        self.what = what
        bytes_per_sample = 2 if self.encoding == PCM16 else 1
        self.frame_bytes = bytes_per_sample * self.channels
        self.max_chunk_bytes = int(self.rate_hz * MAX_CHUNK_SECONDS) * self.frame_bytes
        self._resampler = (
            soxr.ResampleStream(self.rate_hz, target_rate_hz, 1, dtype="int16", quality="HQ")
            if self.rate_hz != target_rate_hz
            else None
        )
        self.samples_in = 0  # input frames seen, for stream offsets

    def convert(self, data: bytes) -> np.ndarray:
        """Validate and convert one chunk; returns int16 samples at the target rate (may be empty)."""
        if not data:
            raise InvalidInput(f"{self.what}: empty audio chunk")
        if len(data) % self.frame_bytes:
            raise InvalidInput(
                f"{self.what}: audio chunk of {len(data)} bytes is not a whole number of "
                f"{self.frame_bytes}-byte frames (PCM16 needs an even length per channel)"
            )
        if len(data) > self.max_chunk_bytes:
            raise InvalidInput(
                f"{self.what}: audio chunk of {len(data)} bytes is longer than {MAX_CHUNK_SECONDS:.0f} s "
                f"({self.max_chunk_bytes} bytes); send 20-100 ms per chunk"
            )
        samples = mulaw_to_pcm16(data) if self.encoding == MULAW else np.frombuffer(data, dtype="<i2")
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1).astype(np.int16)
        self.samples_in += len(samples)
        if self._resampler is None:
            return samples
        return self._resampler.resample_chunk(samples)


class OutboundAudio:
    """Turns PCM16 mono at `source_rate_hz` into the wire format a caller asked for."""

    def __init__(self, fmt: common_pb2.AudioFormat, source_rate_hz: int, what: str):
        self.encoding, self.rate_hz, _ = validate_format(fmt, what)
        self._resampler = (
            soxr.ResampleStream(source_rate_hz, self.rate_hz, 1, dtype="int16", quality="HQ")
            if source_rate_hz != self.rate_hz
            else None
        )

    def convert(self, samples: np.ndarray, last: bool = False) -> bytes:
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last)
        if self.encoding == MULAW:
            return pcm16_to_mulaw(samples)
        return samples.astype("<i2", copy=False).tobytes()

    def bytes_per_second(self) -> int:
        return self.rate_hz * (2 if self.encoding == PCM16 else 1)
