"""How the orchestrator batches caller audio toward the VAD and STT streams.

Pure unit tests: CallerAudio writes to recording stand-ins for the two gRPC calls, so each
message's size and offset can be checked exactly.
"""
from __future__ import annotations

import asyncio

import numpy as np

from voicemesh.orchestrator.forwarding import STT_IDLE_MS, STT_SPEECH_MS, URGENT_MARGIN_MS, VAD_PIECE_MS, CallerAudio

RATE = 16000
FRAME = RATE // 50  # 20 ms


class Recorder:
    def __init__(self):
        self.chunks = []
        self.urgent = []

    async def write(self, message, urgent=True):
        self.chunks.append(message.audio)
        self.urgent.append(urgent)


def loud(index: int) -> np.ndarray:
    return np.full(FRAME, 4000 + index, dtype=np.int16)


def quiet(index: int) -> np.ndarray:
    return np.full(FRAME, index % 50, dtype=np.int16)


def feed(frames: list[tuple[np.ndarray, bool]], then=None, stop_ms: int = URGENT_MARGIN_MS):
    """Push (frame, user_speaking) pairs; returns the VAD and STT chunks as (offset_ms, ms).
    The default stop wait makes every quiet frame while the user speaks urgent."""
    vad, stt = Recorder(), Recorder()
    audio = CallerAudio(vad, stt, RATE, stop_ms)

    async def run():
        for samples, speaking in frames:
            await audio.push(samples, speaking)
        if then:
            await then(audio)

    asyncio.run(run())
    sizes = lambda rec: [(c.offset_ms, len(c.data) // 2 * 1000 // RATE) for c in rec.chunks]  # noqa: E731
    return sizes(vad), sizes(stt), vad, stt


def test_idle_audio_goes_in_pieces():
    vad, stt, _, _ = feed([(quiet(i), False) for i in range(50)])  # 1 s, nobody speaking
    assert vad == [(i * VAD_PIECE_MS, VAD_PIECE_MS) for i in range(1000 // VAD_PIECE_MS)]
    assert stt == [(i * STT_IDLE_MS, STT_IDLE_MS) for i in range(1000 // STT_IDLE_MS)]


def test_while_the_user_speaks_loud_frames_batch_and_a_quiet_one_leaves_at_once():
    frames = [(loud(i), True) for i in range(5)] + [(quiet(i), True) for i in range(3)]
    vad, stt, vad_calls, _ = feed(frames)
    # Loud: 40 ms pieces (the fifth frame waits); the first quiet frame takes it along; then one by one.
    assert vad == [(0, 40), (40, 40), (80, 40), (120, 20), (140, 20)]
    # Full pieces may wait for other sessions' audio on a multiplexed call; a quiet frame may not.
    assert vad_calls.urgent == [False, False, True, True, True]
    # The STT: 100 ms pieces of speech; the urgent quiet frames at once (its pause decode waits on them).
    assert stt == [(0, STT_SPEECH_MS), (100, 20), (120, 20), (140, 20)]
    sent = np.concatenate([np.frombuffer(c.data, "<i2") for c in vad_calls.chunks])
    assert np.array_equal(sent, np.concatenate([f for f, _ in frames]))  # nothing lost, nothing reordered


def test_quiet_frames_become_urgent_only_near_the_end_of_the_stop_wait():
    frames = [(loud(i), True) for i in range(5)] + [(quiet(i), True) for i in range(4)]
    # A 160 ms stop wait: quiet frames are urgent from 60 ms of quiet on (the third).
    vad, stt, vad_calls, _ = feed(frames, stop_ms=URGENT_MARGIN_MS + 60)
    assert vad == [(0, 40), (40, 40), (80, 40), (120, 40), (160, 20)]
    assert vad_calls.urgent == [False, False, False, True, True]
    assert stt == [(0, STT_SPEECH_MS), (100, 60), (160, 20)]  # the first urgent frame takes the quiet before it
    # A loud frame starts the quiet run again.
    frames = [(quiet(0), True), (quiet(1), True), (loud(2), True), (quiet(3), True), (quiet(4), True)]
    _, _, vad_calls, _ = feed(frames, stop_ms=URGENT_MARGIN_MS + 40)
    assert vad_calls.urgent == [True, False, True]


def test_finalize_flushes_the_stt_only_when_speech_may_be_waiting():
    frames = [(loud(i), True) for i in range(5)] + [(quiet(i), True) for i in range(2)]  # 140 ms

    def finalize_at(speech_end_ms):
        async def then(audio):
            await audio.flush_stt(speech_end_ms)
        return then

    long_stop = 800  # no quiet frame here is urgent
    # Speech ended at 80 ms: already in the STT's first 100 ms piece, no write for the silence.
    _, stt, _, _ = feed(frames, finalize_at(80), stop_ms=long_stop)
    assert stt == [(0, 100)]
    # Speech ended at 120 ms: the waiting 40 ms may hold its last words, so they are sent.
    _, stt, _, _ = feed(frames, finalize_at(120), stop_ms=long_stop)
    assert stt == [(0, 100), (100, 40)]
    # A turn start sends everything.
    _, stt, _, _ = feed(frames, finalize_at(None), stop_ms=long_stop)
    assert stt == [(0, 100), (100, 40)]


def test_arrival_times_follow_the_audio():
    vad, stt = Recorder(), Recorder()
    audio = CallerAudio(vad, stt, RATE)

    async def run():
        await audio.push(quiet(0), False)
        first = audio.arrival_time(10)
        await asyncio.sleep(0.01)
        await audio.push(quiet(1), False)
        return first, audio.arrival_time(30), audio.received_ms

    first, second, received = asyncio.run(run())
    assert second > first and received == 40
