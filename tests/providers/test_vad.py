"""VAD: the speech segmenter on synthetic probabilities, and Silero on real (synthesized) speech."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from voicemesh.vad.providers.silero import WINDOW_SAMPLES, SileroVadProvider
from voicemesh.vad.segmenter import EventKind, SegmenterParams, SpeechEvent, SpeechSegmenter, window_volume

RATE = 16000
WINDOW_MS = WINDOW_SAMPLES * 1000 // RATE  # 32
LOUD = 0.85  # volume of conversational speech (about -25 dBFS)


def feed(segmenter: SpeechSegmenter, probabilities, volumes=LOUD, first_window: int = 0):
    """Push windows in order; returns [(window index, event)]."""
    volumes = np.broadcast_to(np.asarray(volumes, dtype=float), (len(probabilities),))
    events = []
    for i, (p, v) in enumerate(zip(probabilities, volumes, strict=False), start=first_window):
        for event in segmenter.push((i + 1) * WINDOW_SAMPLES, p, v):
            events.append((i, event))
    return events


# -- segmenter -------------------------------------------------------------------------------


def test_start_is_emitted_once_speech_lasted_start_secs():
    segmenter = SpeechSegmenter()  # 0.2 s = round(6.25) = 6 windows of 32 ms
    events = feed(segmenter, [0.0] * 10 + [0.95] * 5)
    assert events == []
    assert not segmenter.speaking
    events = feed(segmenter, [0.95] * 3, first_window=15)
    assert len(events) == 1
    index, event = events[0]
    assert index == 15  # the sixth speech window
    assert event.kind is EventKind.STARTED and event.kind == "started"
    assert event.offset_ms == 10 * WINDOW_MS  # where the speech began, not where it was confirmed
    assert event.probability == pytest.approx(0.95)
    assert segmenter.speaking


def test_short_blips_are_ignored():
    segmenter = SpeechSegmenter()
    blips = ([0.99] * 5 + [0.1] * 3) * 10  # 160 ms of speech at a time, never 200 ms
    assert feed(segmenter, blips) == []
    assert not segmenter.speaking


def test_low_confidence_is_not_speech():
    params = SegmenterParams(confidence=0.7)
    assert feed(SpeechSegmenter(params), [0.69] * 100) == []
    assert [e.kind for _, e in feed(SpeechSegmenter(params), [0.7] * 100)] == [EventKind.STARTED]


def test_stop_after_stop_secs_of_non_speech():
    segmenter = SpeechSegmenter()  # 0.8 s = 25 windows
    feed(segmenter, [0.9] * 20)
    assert segmenter.speaking
    events = feed(segmenter, [0.05] * 24, first_window=20)
    assert events == []
    events = feed(segmenter, [0.05] * 3, first_window=44)
    assert len(events) == 1
    index, event = events[0]
    assert index == 44
    assert event.kind is EventKind.STOPPED
    assert event.offset_ms == 20 * WINDOW_MS  # where the speech ended
    assert not segmenter.speaking


def test_pause_shorter_than_stop_secs_keeps_one_segment():
    segmenter = SpeechSegmenter()
    probabilities = [0.0] * 5 + [0.9] * 20 + [0.1] * 20 + [0.7] * 20 + [0.0] * 30
    events = feed(segmenter, probabilities)
    assert [(i, e.kind) for i, e in events] == [(10, EventKind.STARTED), (89, EventKind.STOPPED)]
    started, stopped = events[0][1], events[1][1]
    assert started.offset_ms == 5 * WINDOW_MS
    assert stopped.offset_ms == 65 * WINDOW_MS
    # STOPPED carries the mean over the whole segment, the pause included.
    assert stopped.probability == pytest.approx((20 * 0.9 + 20 * 0.1 + 20 * 0.7) / 60)


def test_quiet_audio_is_ignored_by_min_volume():
    segmenter = SpeechSegmenter(SegmenterParams(min_volume=0.6))
    assert feed(segmenter, [0.99] * 100, volumes=0.45) == []
    # The same probabilities at speaking level do start a segment.
    assert [e.kind for _, e in feed(SpeechSegmenter(), [0.99] * 100, volumes=0.8)] == [EventKind.STARTED]


def test_one_weak_window_does_not_break_a_start_but_silence_does():
    volumes = [0.85] * 3 + [0.5] + [0.85] * 3  # a soft consonant inside a word
    smoothed = feed(SpeechSegmenter(), [0.95] * 7, volumes)
    assert [(i, e.kind) for i, e in smoothed] == [(5, EventKind.STARTED)]
    unsmoothed = feed(SpeechSegmenter(SegmenterParams(volume_release=1.0)), [0.95] * 7, volumes)
    assert unsmoothed == []
    # A falling volume still drops below the gate within a few windows.
    segmenter = SpeechSegmenter()
    feed(segmenter, [0.95] * 10, 0.85)
    feed(segmenter, [0.95] * 3, 0.2, first_window=10)
    assert segmenter.volume < 0.6


def test_flush_closes_an_open_segment():
    segmenter = SpeechSegmenter()
    feed(segmenter, [0.8] * 10 + [0.0] * 5)
    (event,) = segmenter.flush()
    assert isinstance(event, SpeechEvent)
    assert (event.kind, event.offset_ms) == (EventKind.STOPPED, 10 * WINDOW_MS)
    assert event.probability == pytest.approx(0.8)
    assert not segmenter.speaking
    assert segmenter.flush() == []


def test_window_volume_scale():
    t = np.arange(WINDOW_SAMPLES) / RATE

    def tone(dbfs: float) -> np.ndarray:
        rms = 32768 * 10 ** (dbfs / 20)
        return np.round(np.sqrt(2) * rms * np.sin(2 * np.pi * 440 * t)).astype(np.int16)

    assert window_volume(np.zeros(WINDOW_SAMPLES, np.int16)) == 0.0
    assert window_volume(tone(-50)) == pytest.approx(0.6, abs=0.01)
    assert window_volume(tone(-25)) == pytest.approx(0.85, abs=0.01)
    assert window_volume(tone(-5)) == 1.0
    assert window_volume(tone(-30)) > window_volume(tone(-40)) > window_volume(tone(-60))


# -- Silero on real speech -------------------------------------------------------------------

SILENCE_S = 1.0


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, int, int]:
    """One sentence from hibari at 16 kHz between 1 s of faint noise (-70 dBFS) each side.

    Returns (pcm16, first speech sample, last speech sample).
    """
    import hibari
    import soxr

    tts = hibari.Hibari()
    voice = tts("The quick brown fox jumps over the lazy dog near the river bank.", seed=7)
    voice = soxr.resample(voice, hibari.SAMPLE_RATE, RATE)
    loud = np.flatnonzero(np.abs(voice) > 0.02)
    gap = np.zeros(int(SILENCE_S * RATE), np.float32)
    audio = np.concatenate([gap, voice, gap])
    audio += np.random.default_rng(3).normal(0.0, 10 ** (-70 / 20), audio.size)
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
    return pcm, len(gap) + int(loud[0]), len(gap) + int(loud[-1])


@pytest.fixture
async def provider():
    vad = SileroVadProvider()
    await vad.load()
    yield vad
    await vad.close()


async def run_stream(vad: SileroVadProvider, pcm: np.ndarray, chunk_sizes) -> list:
    """Feed pcm in chunks cycling through chunk_sizes; returns all frame results."""
    stream = vad.open_stream()
    results, position, i = [], 0, 0
    while position < len(pcm):
        size = chunk_sizes[i % len(chunk_sizes)]
        results += await stream.process(pcm[position : position + size])
        position += size
        i += 1
    await stream.close()
    return results



def test_info():
    info = SileroVadProvider().info()
    assert (info.provider, info.model, info.sample_rates_hz) == ("silero", "silero-vad-v6", (16000,))


@pytest.mark.models
async def test_open_stream_needs_load():
    vad = SileroVadProvider()
    with pytest.raises(RuntimeError, match="load"):
        vad.open_stream()
    await vad.close()


@pytest.mark.models
async def test_rejects_non_int16(provider):
    with pytest.raises(TypeError):
        await provider.open_stream().process(np.zeros(512, np.float32))


@pytest.mark.models
async def test_speech_is_high_and_silence_low(provider, speech):
    pcm, first, last = speech
    results = await run_stream(provider, pcm, [640])  # 40 ms chunks
    assert len(results) == len(pcm) // WINDOW_SAMPLES
    ends = np.array([r.end_offset_samples for r in results])
    assert np.array_equal(ends, WINDOW_SAMPLES * np.arange(1, len(results) + 1))
    probs = np.array([r.probability for r in results])
    margin = int(0.3 * RATE)  # the model's memory and the word edges blur the boundary
    silence = (ends < first - margin) | (ends - WINDOW_SAMPLES > last + margin)
    inside = (ends - WINDOW_SAMPLES > first + margin) & (ends < last - margin)
    assert silence.sum() > 30 and inside.sum() > 30
    assert probs[silence].max() < 0.2
    assert probs[inside].mean() > 0.9
    assert np.mean(probs[inside] > 0.7) > 0.9

    # End to end with the segmenter: one segment, where the speech is.
    segmenter = SpeechSegmenter()
    events = []
    for r in results:
        window = pcm[r.end_offset_samples - WINDOW_SAMPLES : r.end_offset_samples]
        events += segmenter.push(r.end_offset_samples, r.probability, window_volume(window))
    events += segmenter.flush()
    assert [e.kind for e in events] == [EventKind.STARTED, EventKind.STOPPED]
    assert abs(events[0].offset_ms - first * 1000 / RATE) < 250
    assert abs(events[1].offset_ms - last * 1000 / RATE) < 400
    assert events[1].probability > 0.8


@pytest.mark.models
async def test_chunking_does_not_change_probabilities(provider, speech):
    pcm, _, _ = speech
    reference = await run_stream(provider, pcm, [len(pcm)])  # everything at once
    assert len(reference) == len(pcm) // WINDOW_SAMPLES
    for sizes in ([640], [1600], [WINDOW_SAMPLES], [1, 700, 33, 2048, 511], [160]):
        results = await run_stream(provider, pcm, sizes)
        assert [r.end_offset_samples for r in results] == [r.end_offset_samples for r in reference]
        np.testing.assert_allclose(
            [r.probability for r in results], [r.probability for r in reference], rtol=0, atol=1e-6
        )


@pytest.mark.models
async def test_interleaved_streams_keep_their_own_state(provider, speech):
    pcm, _, _ = speech
    other = np.ascontiguousarray(pcm[::-1])  # different audio: speech at other times, other content
    alone_a = await run_stream(provider, pcm, [1280])
    alone_b = await run_stream(provider, other, [1280])
    assert not np.allclose([r.probability for r in alone_a], [r.probability for r in alone_b], atol=0.05)

    # Strictly alternating chunks of the two streams, different chunk sizes each.
    a, b = provider.open_stream(), provider.open_stream()
    got_a, got_b = [], []
    for i in range(max(len(pcm) // 640, len(other) // 1600) + 2):
        got_a += await a.process(pcm[i * 640 : (i + 1) * 640])
        got_b += await b.process(other[i * 1600 : (i + 1) * 1600])
    # And concurrently: both streams' process() calls in flight on the one worker.
    c, d = provider.open_stream(), provider.open_stream()

    async def drive(stream, audio, size):
        out = []
        for start in range(0, len(audio), size):
            out += await stream.process(audio[start : start + size])
        return out

    got_c, got_d = await asyncio.gather(drive(c, pcm, 960), drive(d, other, 800))
    for got, alone in ((got_a, alone_a), (got_b, alone_b), (got_c, alone_a), (got_d, alone_b)):
        assert [r.end_offset_samples for r in got] == [r.end_offset_samples for r in alone]
        np.testing.assert_allclose([r.probability for r in got], [r.probability for r in alone], atol=1e-6)
