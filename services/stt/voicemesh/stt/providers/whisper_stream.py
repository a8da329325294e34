"""One Whisper recognition stream: the audio ring, interims, pause decodes and finals.

See whisper.py for the model side. Offsets here are stream samples/milliseconds.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import soxr

from voicemesh.stt.providers.base import (
    SttEndOfUtterance, SttResult, SttStream, SttStreamConfig, SttTranscript, Word,
)

if TYPE_CHECKING:
    from voicemesh.stt.providers.decode_queue import DecodeJob
    from voicemesh.stt.providers.whisper import WhisperSttProvider

log = logging.getLogger("voicemesh.stt.providers.whisper")

WHISPER_RATE_HZ = 16_000
WINDOW_S = 30  # Whisper's input window: how much audio a stream keeps
MAX_DECODE_MS = 29_900  # one decode takes at most Whisper's 30 s window (whisper_window.py)
PREROLL_MS = 250  # VAD reports speech starts ~100-250 ms late; keep the onset of the first word
# Audio time between interim decodes. One decode of a few seconds takes ~0.1 s on 2 cores (its
# window cut to the audio; ~0.7 s on a 30 s one), so 0.7 s keeps many streams' captions current.
INTERIM_EVERY_MS = 700
# Pause decodes: when the user pauses (PAUSE_MS of quiet audio, VOICEMESH_STT_PAUSE_MS), decode
# at once, so that if the pause turns out to be the end of the utterance, finalize() can answer
# with that decode instead of starting one (the VAD needs 0.2-0.8 s to confirm the end; a decode
# takes ~0.1 s), and the reply started on it speculatively is under way when the turn is decided.
# 120 ms: 89 ms sooner voice-to-voice than 200 at the same CPU; 80 ms speculates on so many
# pauses inside a sentence that the LLM falls behind (docs/performance.md, bench/pause_decode.py).
PAUSE_MS = 120
QUIET_FRAME_MS = 20
QUIET_RATIO = 0.1  # a frame is quiet below this share of the utterance's loudest frame ...
QUIET_FLOOR_RMS = 150.0  # ... or below this int16 RMS (about -47 dBFS), whichever is higher
# Whisper's "no speech" rule: a segment is dropped when both hold (silence decodes to "you").
NO_SPEECH_PROB = 0.6
LOG_PROB_FLOOR = -1.0
_END = object()  # results() sentinel


@dataclass(frozen=True)
class _DecodeRequest:
    """What one decode covers: the audio and where it sits in the stream."""

    audio: np.ndarray  # float32 16 kHz
    audio_start_ms: int  # stream time of the audio's first sample (word times are offset by it)
    turn_id: str
    start_ms: int  # the span reported on the transcript
    end_ms: int
    asked_at: float  # perf_counter() when it was asked for


@dataclass(frozen=True)
class _Decoded:
    text: str
    confidence: float  # exp(mean avg_logprob) of the kept segments
    words: tuple[Word, ...]  # times in stream ms


def frame_rms(samples: np.ndarray, frame: int) -> np.ndarray:
    """RMS of each whole `frame`-sample frame, in the samples' own units (a partial tail is left out)."""
    count = len(samples) // frame
    frames = samples[: count * frame].reshape(count, frame).astype(np.float32)
    return np.sqrt(np.einsum("ij,ij->i", frames, frames) / frame)


def _word_keys(text: str) -> list[str]:
    """Words normalised for comparing interims ("cap?" vs "capital")."""
    return [w.strip(".,!?;:\"'").lower() for w in text.split()]


def _stability(previous: list[str], current: list[str]) -> float:
    """Share of the current words unchanged since the previous interim (common prefix)."""
    same = 0
    while same < min(len(previous), len(current)) and previous[same] == current[same]:
        same += 1
    return same / len(current) if current else 0.0


class WhisperSttStream(SttStream):
    """One recognition stream. Offsets are stream milliseconds: the audio pushed so far.

    finalize() returns at once; the final transcript and the end of utterance follow on
    results() when the decode is done. Finals come out in the order of the finalize() calls,
    and no interim of an utterance is emitted after its final.

    Decodes go through the provider's queue: a final is queued at once with final priority;
    an interim waits behind every final and is dropped unrun if it goes stale first (this
    stream finalized or closed, or queued a newer interim). A final waits only for a decode
    already running, which it reuses when that decode covers the pause.
    """

    def __init__(self, provider: WhisperSttProvider, config: SttStreamConfig, language: str) -> None:
        self._provider, self._config, self._language = provider, config, language
        self._rate = config.sample_rate_hz
        self._pause_samples = self._samples(provider.pause_ms)  # checked on every push: made once
        self._captions_apart = provider.interim_model_covers(language)  # periodic interims on the interim model
        self._ring = bytearray()  # PCM16, the last WINDOW_S seconds (plus up to 5 s before a trim)
        self._ring_start = 0  # stream sample index of the ring's first sample
        self._total = 0  # samples pushed so far
        self._segment_start = 0  # where audio since the last finalize begins (no turn_start case)
        self._utterance_start: int | None = None  # sample of the open utterance's turn_start
        self._turn_id = ""
        self._generation = 0  # bumped when an utterance ends; interims of older ones are dropped
        self._next_interim_at = 0
        self._previous_words: list[str] = []
        self._interim_task: asyncio.Task | None = None  # its decode queued or running
        self._interim_job: DecodeJob | None = None
        self._interim_generation = 0
        self._interim_reusable = False  # the decode in flight is on the main model (can become the final)
        self._final_task: asyncio.Task | None = None  # the last one; each emits after the one before
        self._final_tasks: set[asyncio.Task] = set()
        self._pending_finals = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._closed = False
        # Pause tracking for the open utterance (see PAUSE_MS).
        self._peak_rms = 0.0
        self._quiet_since: int | None = None  # first sample of the current quiet run
        self._interim_end = 0  # end sample of the interim decode in flight
        self._latest: tuple[int, int, _Decoded] | None = None  # (generation, end sample, result)
        self._announced_pause: int | None = None  # the pause (its first sample) already announced

    def _samples(self, ms: int) -> int:
        return ms * self._rate // 1000

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self._rate

    async def push_audio(self, pcm16: bytes) -> None:
        if self._closed:
            return
        self._ring += pcm16
        self._total += len(pcm16) // 2
        excess = len(self._ring) // 2 - WINDOW_S * self._rate
        if excess > 5 * self._rate:  # trim in 5 s steps, not on every push
            del self._ring[: 2 * excess]
            self._ring_start += excess
        if self._utterance_start is None:
            return
        self._track_pauses(pcm16)
        if self._pending_finals or self._interim_running():
            return  # busy: retry on the next push (a queued interim may be replaced below)
        if self._pause_covered() and self._pause_long_enough():
            self._announce_pause()  # a decode made before the pause was long enough covers it
        elif self._pause_needs_decode():
            self._start_interim(pause=True)
        elif self._config.interim_results and self._total >= self._next_interim_at and not self._pause_covered():
            if not (self._captions_apart and self._quiet_since is not None):
                # On the interim model, a caption started in a quiet tail would hold up the pause
                # decode that may follow; it waits for speech to resume instead.
                self._start_interim(pause=False)

    def _track_pauses(self, pcm16: bytes) -> None:
        """Update the loudest frame and the start of the current quiet run (runs per pushed chunk)."""
        frame = self._samples(QUIET_FRAME_MS)
        samples = np.frombuffer(pcm16, dtype="<i2")
        count = len(samples) // frame
        if not count:
            return
        rms = frame_rms(samples, frame)
        # The threshold grows with the loudest frame so far, this chunk's frames included in order.
        peaks = np.maximum.accumulate(np.maximum(rms, self._peak_rms))
        quiet = rms < np.maximum(QUIET_FLOOR_RMS, QUIET_RATIO * peaks)
        self._peak_rms = float(peaks[-1])
        first = self._total - len(samples)
        if quiet.all():
            if self._quiet_since is None:
                self._quiet_since = first
        else:
            loud_last = count - 1 - int(np.argmin(quiet[::-1]))  # the last frame that was not quiet
            self._quiet_since = first + (loud_last + 1) * frame if loud_last < count - 1 else None

    def _interim_running(self) -> bool:
        """This stream's interim decode has started (it cannot be stopped, only waited for)."""
        return self._interim_task is not None and self._interim_job is not None and self._interim_job.started

    def _pause_needs_decode(self) -> bool:
        """The user has paused, and no decode (done or queued) covers the speech before it."""
        if self._quiet_since is None or self._total - self._quiet_since < self._pause_samples:
            return False
        if self._quiet_since - self._utterance_start < self._pause_samples:
            return False  # no speech in this utterance yet
        queued_covers = (self._interim_task is not None and self._interim_reusable
                         and self._interim_generation == self._generation and self._interim_end >= self._quiet_since)
        return not self._pause_covered() and not queued_covers

    def _pause_long_enough(self) -> bool:
        return self._quiet_since is not None and self._total - self._quiet_since >= self._pause_samples

    def _announce_pause(self) -> None:
        """Send the latest decode once as this pause's transcript (at_pause), if asked for."""
        generation, end, decoded = self._latest
        if self._announced_pause == self._quiet_since:
            return
        self._announced_pause = self._quiet_since
        if self._config.pause_transcripts and decoded.text:
            self._emit_interim(decoded, self._turn_id, (self._ms(self._utterance_start), self._ms(end)), at_pause=True)

    def _pause_covered(self) -> bool:
        """A finished decode already covers everything up to the current pause."""
        latest = self._latest
        return bool(self._quiet_since is not None and latest and latest[0] == self._generation and latest[1] >= self._quiet_since)

    def _reusable_decode(self) -> "_Decoded | asyncio.Task | None":
        """A decode of this utterance that ends inside the current pause: nothing after it is speech."""
        if self._utterance_start is None or self._quiet_since is None:
            return None
        latest = self._latest
        if latest and latest[0] == self._generation and latest[1] >= self._quiet_since:
            return latest[2]
        # Only a decode already running: a queued one costs as much as the final's own decode.
        if (self._interim_running() and self._interim_reusable and self._interim_generation == self._generation
                and self._interim_end >= self._quiet_since):
            return self._interim_task
        return None

    async def turn_start(self, turn_id: str, audio_offset_ms: int) -> None:
        if self._closed:
            return
        self._generation += 1  # replaces an utterance that was never finalized
        self._utterance_start = max(0, self._samples(audio_offset_ms))
        self._turn_id = turn_id
        self._peak_rms, self._quiet_since = 0.0, None
        self._previous_words = []
        self._next_interim_at = self._utterance_start + self._samples(INTERIM_EVERY_MS)

    async def finalize(self) -> None:
        if self._closed:
            return
        end = self._total
        self._provider.queue.discard(self)  # an interim of this utterance not started yet is stale
        reusable = self._reusable_decode()
        if self._utterance_start is not None:
            start_ms = self._ms(self._utterance_start)
            audio_start_ms, audio = self._audio(self._utterance_start - self._samples(PREROLL_MS), end)
        else:
            audio_start_ms, audio = self._audio(self._segment_start, end)
            start_ms = audio_start_ms
        self._generation += 1
        self._utterance_start, turn_id, self._turn_id = None, self._turn_id, ""
        self._segment_start = end
        self._previous_words = []
        self._pending_finals += 1
        final = _DecodeRequest(audio, audio_start_ms, turn_id, start_ms, self._ms(end), time.perf_counter())
        job = None if reusable is not None else self._submit(final, is_final=True)
        self._final_task = asyncio.create_task(self._run_final(self._final_task, final, job, reusable))
        self._final_tasks.add(self._final_task)
        self._final_task.add_done_callback(self._final_tasks.discard)

    async def results(self) -> AsyncIterator[SttResult]:
        while (item := await self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def close(self) -> None:
        """results() ends after the pending finals; an interim not started yet is dropped."""
        if self._closed:
            return
        self._closed = True
        self._generation += 1  # an interim still decoding is dropped
        self._provider.queue.discard(self)
        if self._final_task is not None and not self._final_task.done():
            # Not awaited here: a cancelled close() must not cancel the finals (nor leave
            # results() waiting forever).
            self._final_task.add_done_callback(lambda _: self._queue.put_nowait(_END))
        else:
            self._queue.put_nowait(_END)

    async def abort(self) -> None:
        """Nobody will read the results: drop every queued decode of this stream, end results()."""
        self._closed = True
        self._generation += 1
        self._provider.queue.discard(self, finals=True)
        for task in (self._interim_task, *self._final_tasks):
            if task is not None:
                task.cancel()
        self._queue.put_nowait(_END)

    def _submit(self, request: "_DecodeRequest", is_final: bool, caption: bool = False) -> "DecodeJob":
        """caption: a periodic interim, on the interim model when there is one (no word times:
        interims carry none)."""
        caption = caption and self._captions_apart
        return self._provider.submit_decode(
            request.audio, self._language, self._provider.word_timestamps and not caption, request.audio_start_ms,
            final=is_final, key=self, interim=caption,
        )

    def _audio(self, start: int, end: int) -> tuple[int, np.ndarray]:
        """Stream samples [start, end), clipped to what the ring holds and to one decode:
        (where the audio really starts, in stream ms; float32 audio at 16 kHz)."""
        start = max(start, self._ring_start, end - self._samples(MAX_DECODE_MS))
        lo, hi = 2 * (start - self._ring_start), 2 * max(0, end - self._ring_start)
        audio = np.frombuffer(bytes(self._ring[lo:hi]), dtype="<i2").astype(np.float32) / 32768.0
        if self._rate != WHISPER_RATE_HZ:
            audio = soxr.resample(audio, self._rate, WHISPER_RATE_HZ).astype(np.float32)
        return self._ms(start), audio

    def _start_interim(self, pause: bool) -> None:
        """Queue an interim decode of the open utterance; it replaces one still queued.
        pause: the decode for a pause, always on the main model (it may become the final)."""
        self._next_interim_at = self._total + self._samples(INTERIM_EVERY_MS)
        audio_start_ms, audio = self._audio(self._utterance_start - self._samples(PREROLL_MS), self._total)
        span = (self._ms(self._utterance_start), self._ms(self._total))
        self._interim_end, self._interim_generation = self._total, self._generation
        # On the main model, the same settings as a final, so a decode made in a pause can become the final.
        self._interim_reusable = pause or not self._captions_apart
        request = _DecodeRequest(audio, audio_start_ms, self._turn_id, span[0], span[1], time.perf_counter())
        self._interim_job = self._submit(request, is_final=False, caption=not pause)
        self._interim_task = asyncio.create_task(self._run_interim(
            self._interim_job, self._generation, self._turn_id, span, self._interim_reusable))

    async def _run_interim(
        self, job: "DecodeJob", generation: int, turn_id: str, span: tuple[int, int], reusable: bool,
    ) -> "_Decoded | None":
        try:
            decoded = await job.future
        except Exception:  # an interim is disposable; the final reports decode errors
            log.exception("whisper interim decode failed")
            return None
        finally:
            if self._interim_task is asyncio.current_task():  # not replaced meanwhile
                self._interim_task = self._interim_job = None
        if decoded is None:
            return None  # dropped unrun: stale before its turn came
        if reusable:
            self._latest = (generation, self._samples(span[1]), decoded)
        if generation != self._generation or not decoded.text:
            return decoded  # finalized or replaced meanwhile, or nothing heard yet
        if self._pause_covered() and self._pause_long_enough():
            self._announce_pause()
        elif self._config.interim_results:
            self._emit_interim(decoded, turn_id, span, at_pause=False)
        return decoded

    def _emit_interim(self, decoded: "_Decoded", turn_id: str, span: tuple[int, int], at_pause: bool) -> None:
        words = _word_keys(decoded.text)
        stability, self._previous_words = _stability(self._previous_words, words), words
        self._queue.put_nowait(SttTranscript(
            text=decoded.text, is_final=False, stability=stability, confidence=decoded.confidence,
            language=self._language, start_ms=span[0], end_ms=span[1], turn_id=turn_id, at_pause=at_pause,
        ))

    async def _run_final(
        self, previous: asyncio.Task | None, final: "_DecodeRequest", job: "DecodeJob | None",
        reusable: "_Decoded | asyncio.Task | None",
    ) -> None:
        try:
            decoded: _Decoded | None = None
            error: Exception | None = None
            try:
                if isinstance(reusable, asyncio.Task):  # the running interim covers the pause
                    reusable = await reusable
                if reusable is not None:  # decoded during the pause: only silence came after it
                    decoded = reusable
                else:
                    # Word times come relative to the decoded audio, which starts at the pre-roll.
                    job = job or self._submit(final, is_final=True)  # the reused interim failed
                    decoded = await job.future
            except Exception as exc:  # surfaces from results(), so the service can fail the stream
                log.exception("whisper final decode failed")
                error = exc
            if previous is not None:
                await previous  # finals come out in the order they were asked for
            if error is not None:
                self._queue.put_nowait(error)
                return
            if decoded is None:
                return  # dropped unrun: the stream was aborted
            log.debug("whisper final: %.0f ms after finalize for %.2f s of audio%s",
                      (time.perf_counter() - final.asked_at) * 1000, len(final.audio) / WHISPER_RATE_HZ,
                      "" if job else " (the pause decode)")
            self._queue.put_nowait(SttTranscript(
                text=decoded.text, is_final=True, stability=1.0, confidence=decoded.confidence, language=self._language,
                start_ms=final.start_ms, end_ms=final.end_ms, words=decoded.words, turn_id=final.turn_id,
            ))
            self._queue.put_nowait(SttEndOfUtterance(offset_ms=final.end_ms, turn_id=final.turn_id))
        finally:
            self._pending_finals -= 1
