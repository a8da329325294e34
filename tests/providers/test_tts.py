"""TTS providers with their real engines: hibari (ONNX model in its wheel) and espeak-ng (binary)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from voicemesh.tts.providers.base import SynthesisRequest
from voicemesh.tts.providers.espeak import EspeakTtsProvider
from voicemesh.tts.providers.hibari import HibariTtsProvider

TWO_SENTENCES = "Hello there. How are you today?"
DEADLINE_S = 60  # for a state the provider must reach (far sooner when idle); never a speed claim
LONG_TEXT = " ".join(f"This is sentence number {n} of a long paragraph." for n in range(40))


async def collect(provider, request: SynthesisRequest) -> list[bytes]:
    return [chunk async for chunk in provider.synthesize(request)]


def assert_speech(chunks: list[bytes], sample_rate: int) -> None:
    """More than one chunk of whole PCM16 samples, over half a second, clearly not silence."""
    assert len(chunks) > 1
    assert all(chunk and len(chunk) % 2 == 0 for chunk in chunks)
    audio = np.frombuffer(b"".join(chunks), dtype="<i2").astype(np.float32) / 32768.0
    assert audio.size / sample_rate > 0.5
    assert np.sqrt(np.mean(audio**2)) > 0.01  # silence (or a stuck zero stream) is ~0
    assert np.abs(audio).max() > 0.1


# -- hibari -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hibari():
    # The provider keeps no loop-bound state (its own executor, no asyncio objects), so one
    # loaded instance can serve the per-test event loops.
    provider = HibariTtsProvider(threads=1)
    asyncio.run(provider.load())
    yield provider
    asyncio.run(provider.close())


async def test_hibari_speaks_two_sentences_at_24khz(hibari):
    assert hibari.sample_rate_hz == 24_000
    arrivals: list[tuple[int, float]] = []
    chunks: list[bytes] = []
    async for chunk in hibari.synthesize(SynthesisRequest(text=TWO_SENTENCES)):
        arrivals.append((len(chunks), asyncio.get_running_loop().time()))
        chunks.append(chunk)
    assert_speech(chunks, 24_000)
    assert arrivals[0][1] < arrivals[-1][1]  # the first chunk was handed out before the last existed
    assert max(len(chunk) for chunk in chunks) <= hibari.chunk_bytes  # ~100 ms chunks


async def test_hibari_streams_before_the_whole_text_is_synthesized(hibari, monkeypatch):
    rendered: list[str] = []
    render_threads: set[str] = set()
    original = hibari._render

    def counting_render(*args):
        pcm = original(*args)
        rendered.append(args[1])
        render_threads.add(threading.current_thread().name)
        return pcm

    monkeypatch.setattr(hibari, "_render", counting_render)
    stream = hibari.synthesize(SynthesisRequest(text=LONG_TEXT))
    async with contextlib.aclosing(stream):
        first = await anext(stream)
        done_at_first_chunk = len(rendered)
        rest = [chunk async for chunk in stream]
    assert first and rest
    # At most the current phrase and the prefetched next one are ready when audio starts.
    assert done_at_first_chunk <= 2 < len(rendered)
    assert threading.current_thread().name not in render_threads  # inference is off the loop
    assert all(name.startswith("hibari") for name in render_threads)


async def test_hibari_unknown_voice_lists_the_available_ones(hibari):
    with pytest.raises(ValueError, match="heart"):
        await collect(hibari, SynthesisRequest(text="Hi.", voice="no-such-voice"))


async def test_hibari_reports_only_voices_on_disk(hibari):
    voices = hibari.voices()
    assert "heart" in voices  # bundled in the wheel
    info = hibari.info()
    assert (info.provider, info.model, info.sample_rates_hz) == ("hibari", "hibari-0.2.1", (24_000,))
    assert info.details["voice"] == "heart"


async def test_hibari_rejects_out_of_range_speed_and_skips_empty_text(hibari):
    with pytest.raises(ValueError, match="speed"):
        await collect(hibari, SynthesisRequest(text="Hi.", speed=5.0))
    assert await collect(hibari, SynthesisRequest(text="   ")) == []


async def test_hibari_speed_changes_duration(hibari):
    normal = sum(map(len, await collect(hibari, SynthesisRequest(text=TWO_SENTENCES))))
    fast = sum(map(len, await collect(hibari, SynthesisRequest(text=TWO_SENTENCES, speed=1.5))))
    assert fast < normal * 0.85


# -- espeak-ng ----------------------------------------------------------------------------

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng binary not installed (apt-get install espeak-ng)"
)


@pytest.fixture(scope="module")
def espeak():
    provider = EspeakTtsProvider()
    asyncio.run(provider.load())  # subprocesses are per request, nothing is bound to this loop
    return provider


def espeak_children() -> list[int]:
    """Our espeak-ng child processes, zombies included (they stay in /proc until reaped)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            ppid = int(text[text.rindex(")") + 2 :].split()[1])
            if ppid == os.getpid() and comm == "espeak-ng":
                pids.append(int(stat.parent.name))
    return pids


@needs_espeak
async def test_espeak_speaks_two_sentences_at_22khz(espeak):
    assert espeak.sample_rate_hz == 22_050
    chunks = await collect(espeak, SynthesisRequest(text=TWO_SENTENCES))
    assert_speech(chunks, 22_050)
    assert espeak_children() == []


@needs_espeak
async def test_espeak_unknown_voice_raises(espeak):
    assert "en-us" in espeak.voices()
    with pytest.raises(ValueError, match="en-us"):
        await collect(espeak, SynthesisRequest(text="Hi.", voice="no-such-voice"))
    with pytest.raises(ValueError):
        await collect(espeak, SynthesisRequest(text="Hi.", voice="en-us+no-such-variant"))


@needs_espeak
async def test_espeak_variant_and_language_pick_a_voice(espeak):
    assert_speech(await collect(espeak, SynthesisRequest(text=TWO_SENTENCES, voice="en-us+f3")), 22_050)
    german = SynthesisRequest(text="Guten Tag, wie geht es?", language="de")
    assert_speech(await collect(espeak, german), 22_050)


@needs_espeak
async def test_espeak_cancelled_consumer_leaves_no_child(espeak, monkeypatch):
    started = asyncio.Event()
    seen: list[int] = []
    killed: list[int] = []
    original_kill = asyncio.subprocess.Process.kill

    def recording_kill(process):
        killed.append(process.pid)
        original_kill(process)

    monkeypatch.setattr(asyncio.subprocess.Process, "kill", recording_kill)

    async def slow_consumer():
        async with contextlib.aclosing(espeak.synthesize(SynthesisRequest(text=LONG_TEXT))) as stream:
            async for _ in stream:
                seen.extend(espeak_children())
                started.set()
                await asyncio.sleep(60)  # stalls; espeak blocks on the full stdout pipe

    task = asyncio.create_task(slow_consumer())
    waiter = asyncio.ensure_future(started.wait())
    await asyncio.wait({waiter, task}, timeout=DEADLINE_S, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not started.is_set():
        if task.done():
            task.result()  # what went wrong
        task.cancel()
        raise AssertionError(f"no audio within {DEADLINE_S} s (done: {task.done()})")
    assert seen and espeak_children() == seen  # the child was alive mid-stream
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert killed == seen  # stopped at once, not left to synthesize the rest
    assert espeak_children() == []  # and reaped, not a zombie


@needs_espeak
async def test_espeak_abandoned_generator_is_cleaned_up(espeak):
    stream = espeak.synthesize(SynthesisRequest(text=LONG_TEXT))
    assert await anext(stream)
    assert espeak_children()
    del stream  # never closed: asyncio's async-generator finalizer must still end the child
    deadline = asyncio.get_running_loop().time() + DEADLINE_S  # liveness bound, not a timing claim
    while espeak_children() or asyncio.all_tasks() != {asyncio.current_task()}:
        # until the child is reaped and the finalizer's aclose() task has finished
        assert asyncio.get_running_loop().time() < deadline, (
            f"after {DEADLINE_S} s: children {espeak_children()}, tasks {asyncio.all_tasks()}")
        await asyncio.sleep(0.01)
