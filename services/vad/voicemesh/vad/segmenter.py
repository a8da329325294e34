"""Turns per-window speech probabilities into speech STARTED / STOPPED events.

Provider-independent: any VAD that yields (window end, probability) pairs can drive it.
The state machine follows Pipecat's VADAnalyzer: QUIET -> STARTING -> SPEAKING ->
STOPPING -> QUIET, where a window "is speech" when its probability >= `confidence` and its
(smoothed) volume >= `min_volume`. Speech must last `start_secs` without a break to start
a segment (short blips are ignored), and silence must last `stop_secs` to end it (short
pauses between words do not split the segment).

Volume: the window's RMS in dBFS mapped linearly from -110..-10 dBFS onto 0..1 (clamped).
This is Pipecat's scale (it maps int16-unit loudness -20..80, i.e. about -110..-10 dBFS),
so Pipecat's default min_volume 0.6 keeps its meaning: the gate sits at -50 dBFS.
Conversational speech (-20..-35 dBFS RMS, about 0.75..0.9) passes easily; microphone
hiss (-60..-75 dBFS, 0.35..0.5) does not. The volume is then followed like an envelope:
a rise is taken at once, a fall is smoothed (factor 0.2 per window), so a weak consonant
(-50..-60 dBFS windows are common inside words) does not break a run. Pipecat smooths both
ways; that delays the start by ~200 ms after digital silence and can merge a sentence pause
into the stop timer, which an instant rise avoids.

With `smart_turn`, reaching stop_secs only proposes a stop: `push` returns STOP_CANDIDATE
and the caller answers with `resolve_stop(end-of-turn probability)`. At or above the
threshold that returns STOPPED. Below it the stop is held: the user still counts as
speaking; speech that resumes continues the same segment (no new STARTED), and silence that
reaches max_silence_secs since the speech end returns STOPPED with `silence_fallback`. While
held, every further `smart_turn_recheck_secs` of silence proposes the stop again (Smart Turn
hears the trailing silence: of 36 complete requests in 6 voices it doubted 8 at 0.2 s of
silence, 2 at 0.6 s and none at 1.0 s; docs/conversation.md, bench/smart_turn_tails.py), so a
doubted end of turn costs one to two seconds, not the whole max_silence_secs.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

VOLUME_FLOOR_DBFS = -110.0  # maps to volume 0
VOLUME_CEIL_DBFS = -10.0  # maps to volume 1
_INT16_FULL_SCALE = 32768.0


def window_volume(samples: np.ndarray) -> float:
    """Normalised loudness (0..1) of an int16 window; see the module docstring for the scale."""
    if samples.size == 0:
        return 0.0
    as_float = samples.astype(np.float32)
    mean_square = float(np.dot(as_float, as_float)) / samples.size
    if mean_square <= 0.0:
        return 0.0
    # 10*log10(mean square) == 20*log10(rms); relative to int16 full scale.
    dbfs = 10.0 * math.log10(mean_square) - 20.0 * math.log10(_INT16_FULL_SCALE)
    scaled = (dbfs - VOLUME_FLOOR_DBFS) / (VOLUME_CEIL_DBFS - VOLUME_FLOOR_DBFS)
    return min(1.0, max(0.0, scaled))


@dataclass(frozen=True)
class SegmenterParams:
    confidence: float = 0.7  # minimum speech probability of a speech window
    start_secs: float = 0.2  # speech needed, unbroken, before STARTED
    stop_secs: float = 0.8  # non-speech needed, unbroken, before STOPPED
    min_volume: float = 0.6  # minimum smoothed volume of a speech window
    volume_release: float = 0.2  # how fast a falling volume is followed per window; 1.0: no smoothing
    smart_turn: bool = False  # stop_secs proposes a stop (STOP_CANDIDATE) instead of deciding it
    smart_turn_threshold: float = 0.5  # end-of-turn probability that confirms a proposed stop
    max_silence_secs: float = 3.0  # with smart_turn: silence since the speech end that stops anyway
    smart_turn_recheck_secs: float = 0.4  # a held stop is proposed again after each such silence (0: never)


class EventKind(str, enum.Enum):
    STARTED = "started"
    STOPPED = "stopped"
    STOP_CANDIDATE = "stop_candidate"  # smart_turn only: answer with resolve_stop()


@dataclass(frozen=True)
class SpeechEvent:
    kind: EventKind
    offset_ms: int  # STARTED: where the speech began; STOPPED: where it ended (16 kHz stream)
    # STARTED: mean probability of the windows that confirmed the start.
    # STOPPED: mean probability over the whole segment, from its start to its last speech window.
    probability: float
    # STOPPED with smart_turn: the end-of-turn probability of the pause, and whether the stop
    # came from max_silence_secs rather than the model.
    end_of_turn_probability: float = 0.0
    silence_fallback: bool = False


class _State(enum.Enum):
    QUIET = 0
    STARTING = 1
    SPEAKING = 2
    STOPPING = 3
    PENDING = 4  # smart_turn: a stop was proposed, resolve_stop() not yet called
    HELD = 5  # smart_turn: the proposed stop was rejected; waiting for speech or max_silence_secs


class SpeechSegmenter:
    """Per-stream state machine; feed it every window in order with `push`.

    window_samples: length of one analysis window (512 for Silero at 16 kHz); the start and
    stop durations are counted in whole windows, rounded like Pipecat does.
    """

    def __init__(
        self,
        params: SegmenterParams | None = None,
        window_samples: int = 512,
        sample_rate_hz: int = 16000,
    ) -> None:
        self.params = params or SegmenterParams()
        self._window = window_samples
        self._rate = sample_rate_hz
        window_secs = window_samples / sample_rate_hz
        self._start_windows = max(1, round(self.params.start_secs / window_secs))
        self._stop_windows = max(1, round(self.params.stop_secs / window_secs))
        self._max_silence_windows = max(self._stop_windows, round(self.params.max_silence_secs / window_secs))
        recheck = self.params.smart_turn_recheck_secs
        self._recheck_windows = max(1, round(recheck / window_secs)) if recheck > 0 else 0
        self._end_of_turn = 0.0  # the latest end-of-turn probability of this segment
        self._state = _State.QUIET
        self._volume = 0.0  # the envelope of the raw window volumes
        self._run = 0  # consecutive windows in the current STARTING or STOPPING run
        self._segment_start = 0  # samples: start of the first speech window of the segment
        self._speech_end = 0  # samples: end of the latest speech window
        self._prob_sum = 0.0  # over all windows since the segment start
        self._prob_count = 0
        self._speech_prob_sum = 0.0  # the same sums, frozen at the latest speech window
        self._speech_prob_count = 0

    @property
    def speaking(self) -> bool:
        """True between STARTED and STOPPED."""
        return self._state in (_State.SPEAKING, _State.STOPPING, _State.PENDING, _State.HELD)

    @property
    def volume(self) -> float:
        """The volume envelope after the latest window (what min_volume is compared with)."""
        return self._volume

    def push(self, window_end_samples: int, probability: float, volume: float) -> list[SpeechEvent]:
        """Feed one window (its end offset, speech probability and raw volume); returns 0 or 1 events."""
        p = self.params
        if volume >= self._volume:
            self._volume = volume
        else:
            self._volume += p.volume_release * (volume - self._volume)
        is_speech = probability >= p.confidence and self._volume >= p.min_volume
        state = self._state
        if state is _State.QUIET:
            if is_speech:
                self._begin_segment(window_end_samples, probability)
                if self._run >= self._start_windows:
                    return [self._started()]
            return []
        self._prob_sum += probability
        self._prob_count += 1
        if state is _State.STARTING:
            if not is_speech:
                self._state = _State.QUIET  # a blip shorter than start_secs: forget it
                return []
            self._mark_speech(window_end_samples)
            self._run += 1
            if self._run >= self._start_windows:
                return [self._started()]
            return []
        if is_speech:  # also ends a held stop: the same segment goes on
            self._mark_speech(window_end_samples)
            self._state = _State.SPEAKING
            return []
        if state is _State.SPEAKING:
            self._state = _State.STOPPING
            self._run = 1
        else:
            self._run += 1
        if state in (_State.PENDING, _State.HELD):
            if self._run >= self._max_silence_windows:
                return [self._stopped(silence_fallback=True)]
            if state is _State.HELD and self._recheck_windows and (self._run - self._stop_windows) % self._recheck_windows == 0:
                self._state = _State.PENDING  # more silence since the model doubted: ask again
                return [self._event(EventKind.STOP_CANDIDATE)]
            return []
        if self._run >= self._stop_windows:
            if self.params.smart_turn:
                self._state = _State.PENDING
                return [self._event(EventKind.STOP_CANDIDATE)]
            return [self._stopped()]
        return []

    def resolve_stop(self, end_of_turn_probability: float) -> list[SpeechEvent]:
        """Answer a STOP_CANDIDATE: STOPPED when the probability reaches the threshold, else
        hold the stop (returns nothing). A no-op once the candidate is moot (speech resumed,
        or the silence fallback already stopped the segment)."""
        if self._state is not _State.PENDING:
            return []
        self._end_of_turn = end_of_turn_probability
        if end_of_turn_probability >= self.params.smart_turn_threshold:
            return [self._stopped()]
        self._state = _State.HELD
        return []

    def flush(self) -> list[SpeechEvent]:
        """End of stream: close an open segment (STOPPED at its last speech window), reset."""
        events = [self._stopped()] if self.speaking else []
        self._state = _State.QUIET
        return events

    def _begin_segment(self, window_end: int, probability: float) -> None:
        self._state = _State.STARTING
        self._run = 1
        self._segment_start = max(0, window_end - self._window)
        self._prob_sum = probability
        self._prob_count = 1
        self._end_of_turn = 0.0
        self._mark_speech(window_end)

    def _mark_speech(self, window_end: int) -> None:
        self._speech_end = window_end
        self._speech_prob_sum = self._prob_sum
        self._speech_prob_count = self._prob_count

    def _started(self) -> SpeechEvent:
        self._state = _State.SPEAKING
        return SpeechEvent(
            EventKind.STARTED,
            self._to_ms(self._segment_start),
            self._speech_prob_sum / self._speech_prob_count,
        )

    def _stopped(self, silence_fallback: bool = False) -> SpeechEvent:
        self._state = _State.QUIET
        return self._event(EventKind.STOPPED, silence_fallback)

    def _event(self, kind: EventKind, silence_fallback: bool = False) -> SpeechEvent:
        """STOPPED or STOP_CANDIDATE at the latest speech window."""
        return SpeechEvent(
            kind,
            self._to_ms(self._speech_end),
            self._speech_prob_sum / self._speech_prob_count,
            self._end_of_turn,
            silence_fallback,
        )

    def _to_ms(self, samples: int) -> int:
        return samples * 1000 // self._rate
