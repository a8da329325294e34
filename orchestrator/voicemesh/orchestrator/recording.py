"""Session transcript and stereo recording (user left, bot right), as RecordingOptions asks.

Alignment. Both channels live on one session clock that starts when the recorder is made
(`start_monotonic`). Each channel is a sequence of runs of audio separated by silence:
- the first chunk after silence goes exactly where the clock says it started: bot audio at
  the time it was sent (the caller plays it as it arrives, or right after audio already
  queued), caller audio at its arrival time minus its duration (arrival marks its end);
- later chunks follow the previous one back to back (the caller streams at real time, and
  Playout sends bot audio ahead of time but contiguous), unless the clock says a chunk started
  more than the channel's jitter allowance later, which makes a gap of silence;
- audio is never placed over earlier audio of its channel: it is too late for that.
So bot audio sent in a burst (Playout's 250 ms lead) lands where it is played, and what the
caller hears and says line up to within tens of milliseconds. Bot audio the caller drops on
ClearPlayback (up to the lead) stays in the recording: it is what was sent.

A stretch is final once both channels have passed it, or once the clock shows nothing can
land there any more (silence). Final audio is appended to the WAV and streamed as
RecordingAudio in 250 ms pieces, so a long session never sits in memory.

wav_path is written by the orchestrator process, with its permissions, on the server's disk.
It is refused unless the operator sets VOICEMESH_RECORDING_DIR, and must then resolve
(symlinks and `..` included) to a file inside that directory; it must be absolute, its
directory must exist, and an existing file is never overwritten.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
import wave
from collections import deque
from collections.abc import Callable

import numpy as np
import soxr

from voicemesh.orchestrator import events
from voicemesh.runtime.audio import MAX_CHUNK_SECONDS, MAX_RATE_HZ, MIN_RATE_HZ, MULAW, mulaw_to_pcm16, validate_format
from voicemesh.runtime.errors import InvalidInput
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb

log = logging.getLogger("voicemesh.recording")
RECORDING_DIR_ENV = "VOICEMESH_RECORDING_DIR"
DEFAULT_RATE_HZ = 16000
PIECE_SECONDS = 0.25  # size of the WAV appends and RecordingAudio events
USER_JITTER_S = 0.3  # caller audio arriving up to this late still continues its run
BOT_JITTER_S = 0.02  # bot audio is paced by this process: only timer noise


def utc_timestamp() -> str:
    """Now as ISO 8601 UTC with milliseconds, e.g. 2026-11-21T06:45:19.156Z."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def checked_wav_path(path: str) -> str:
    """The real path to create for RecordingOptions.wav_path, or InvalidInput saying why not."""
    what = "Converse: recording.wav_path"
    if not os.path.isabs(path):
        raise InvalidInput(f"{what} must be an absolute path on the server, got {path!r}")
    real = os.path.realpath(path)
    root = os.environ.get(RECORDING_DIR_ENV)
    if not root:  # a client must never choose where the server writes, unless the operator allows a place
        raise InvalidInput(f"{what}: server-side recording is off; the operator enables it by setting {RECORDING_DIR_ENV}")
    if root:
        root_real = os.path.realpath(root)
        if real == root_real or os.path.commonpath([real, root_real]) != root_real:
            raise InvalidInput(f"{what} {path!r} is outside {root}, the only directory this server records to")
    parent = os.path.dirname(real)
    if not os.path.isdir(parent):
        raise InvalidInput(f"{what}: directory {os.path.dirname(path)!r} does not exist on the server")
    if not os.access(parent, os.W_OK):
        raise InvalidInput(f"{what}: directory {os.path.dirname(path)!r} is not writable by the server")
    if os.path.lexists(path) or os.path.lexists(real):
        raise InvalidInput(f"{what} {path!r} already exists; recordings never overwrite a file")
    return real


class _Channel:
    """One side of the recording: audio resampled to the recording rate, placed on the clock.

    Positions are absolute sample indices at the recording rate. `end` is where the next
    sample goes; everything before it is settled (only the WAV writer takes it away)."""

    def __init__(self, in_rate: int, out_rate: int, jitter_s: float, lookback_s: float):
        self.ratio = out_rate / in_rate
        self.jitter = round(jitter_s * out_rate)
        self.lookback = round(lookback_s * out_rate)  # how far before its report a chunk may start
        self._resampler = (
            soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality="HQ") if in_rate != out_rate else None
        )
        self._held: deque[np.ndarray] = deque()  # settled samples not yet taken
        self.end = 0
        self._run_start, self._run_in = 0, 0  # the current run: where it began, input samples so far

    def _expected_end(self) -> int:  # the run's end counting what the resampler still holds
        return self._run_start + round(self._run_in * self.ratio)

    def add(self, samples: np.ndarray, clock_start: int) -> None:
        """Place `samples` (input rate, int16) that the clock says began at `clock_start`."""
        if not len(samples):
            return
        if self._run_in == 0 or clock_start > self._expected_end() + self.jitter:
            self._new_run(clock_start)
        self._run_in += len(samples)
        self._append(self._resampler.resample_chunk(samples) if self._resampler else samples)

    def advance(self, now: int) -> None:
        """The clock reads `now`: settle the silence that no future chunk can land in."""
        limit = now - self.lookback
        if limit > self._expected_end() + self.jitter:
            self._new_run(limit)

    def finish(self, length: int) -> None:
        """Flush the resampler and pad with silence up to `length` (the end of the recording)."""
        self._new_run(length)

    def take(self, count: int) -> np.ndarray:
        """The next `count` settled samples (count <= what is held)."""
        parts: list[np.ndarray] = []
        while count > 0:
            head = self._held.popleft()
            if len(head) > count:
                self._held.appendleft(head[count:])
                head = head[:count]
            parts.append(head)
            count -= len(head)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _new_run(self, position: int) -> None:
        if self._resampler is not None and self._run_in:
            self._append(self._resampler.resample_chunk(np.zeros(0, np.int16), last=True))
            self._resampler.clear()
        if position > self.end:
            self._append(np.zeros(position - self.end, np.int16))
        self._run_start, self._run_in = self.end, 0

    def _append(self, samples: np.ndarray) -> None:
        if len(samples):
            self._held.append(samples)
            self.end += len(samples)


class SessionRecorder:
    """Transcript events and the stereo recording of one session. Not thread-safe: call it
    from the session's event loop. Always call close(), also when the session fails."""

    def __init__(
        self,
        options: pb.RecordingOptions,
        emit: Callable[[pb.ConverseResponse], None],
        bot_format: common_pb2.AudioFormat,
        user_rate_hz: int = 16000,
        start_monotonic: float | None = None,
    ):
        self.rate_hz = options.sample_rate_hz or DEFAULT_RATE_HZ
        if not MIN_RATE_HZ <= self.rate_hz <= MAX_RATE_HZ:
            raise InvalidInput(
                f"Converse: recording.sample_rate_hz {self.rate_hz} is outside {MIN_RATE_HZ}-{MAX_RATE_HZ} Hz (0: 16000)"
            )
        self._emit = emit
        self.transcript_on = options.transcript
        self.stream_on = options.stream_audio
        self.entries: list[pb.TranscriptEntry] = []
        self._bot_encoding, bot_rate, _ = validate_format(bot_format, "Converse: output_format")
        self._start = time.monotonic() if start_monotonic is None else start_monotonic
        self._user = _Channel(user_rate_hz, self.rate_hz, USER_JITTER_S, MAX_CHUNK_SECONDS)
        self._bot = _Channel(bot_rate, self.rate_hz, BOT_JITTER_S, 0.0)
        self._written = 0  # frames already written and streamed
        self._seq = 0
        self._closed = False
        self.wav_path = checked_wav_path(options.wav_path) if options.wav_path else None
        self._file = self._wav = None
        if self.wav_path:
            try:
                self._file = open(self.wav_path, "xb")  # x: never follow or replace an existing file
            except OSError as err:
                raise InvalidInput(
                    f"Converse: recording.wav_path {options.wav_path!r} cannot be created: {err.strerror}") from None
            self._wav = wave.open(self._file, "wb")
            self._wav.setnchannels(2)
            self._wav.setsampwidth(2)
            self._wav.setframerate(self.rate_hz)
            log.info("recording to %s", self.wav_path)
        self.records_audio = self._wav is not None or self.stream_on

    # ---- input ---------------------------------------------------------------------------
    def user_audio(self, samples: np.ndarray, arrival_monotonic: float) -> None:
        """Caller audio as forwarded to VAD and STT (int16 mono at user_rate_hz), when it arrived."""
        if not self.records_audio or self._closed:
            return
        length = round(len(samples) * self._user.ratio)
        self._user.add(np.asarray(samples, dtype=np.int16), self._position(arrival_monotonic) - length)
        self.advance(arrival_monotonic)

    def bot_audio(self, data: bytes, sent_monotonic: float) -> None:
        """Bot audio exactly as sent to the caller (the session's output format), when it was sent."""
        if not self.records_audio or self._closed:
            return
        samples = mulaw_to_pcm16(data) if self._bot_encoding == MULAW else np.frombuffer(data, dtype="<i2")
        self._bot.add(samples, self._position(sent_monotonic))
        self.advance(sent_monotonic)

    def advance(self, now_monotonic: float | None = None) -> None:
        """Settle silence up to the clock and stream what is final. Audio input calls this
        itself; call it now and then (say each second) to keep silent stretches flowing."""
        if not self.records_audio or self._closed:
            return
        now = self._position(time.monotonic() if now_monotonic is None else now_monotonic)
        self._user.advance(now)
        self._bot.advance(now)
        self._flush(min(self._user.end, self._bot.end), whole_pieces=True)

    def entry(self, role: str, text: str, interrupted: bool = False) -> pb.TranscriptEntry:
        """Record one transcript line ("user" or "assistant"); sends it when transcript is on."""
        if role not in ("user", "assistant"):
            raise ValueError(f"transcript role must be 'user' or 'assistant', not {role!r}")
        item = pb.TranscriptEntry(role=role, text=text, timestamp=utc_timestamp(), interrupted=interrupted)
        self.entries.append(item)
        if self.transcript_on:
            self._emit(events.transcript_entry(item))
        return item

    # As a seams.TurnObserver: the transcript holds what joined the context.
    def turn_opened(self, turn) -> None:
        pass

    def turn_finished(self, turn) -> None:
        pass

    def said(self, role: str, text: str, interrupted: bool) -> None:
        self.entry(role, text, interrupted=interrupted)

    def close(self, now_monotonic: float | None = None) -> None:
        """End the recording at the clock's `now` (or later, if audio reached further): streams
        the rest and completes the WAV. Call before SessionEnded is sent. Idempotent."""
        if self._closed:
            return
        if self.records_audio:
            now = self._position(time.monotonic() if now_monotonic is None else now_monotonic)
            length = max(now, self._user.end, self._bot.end)
            self._user.finish(length)
            self._bot.finish(length)
            length = max(self._user.end, self._bot.end)  # resampler tails may reach a little further
            self._user.finish(length)
            self._bot.finish(length)
            self._flush(length, whole_pieces=False)
        self._closed = True
        if self._wav is not None:
            self._close_wav()
            log.info("recording written to %s (%.1f s)", self.wav_path, self._written / self.rate_hz)

    # ---- internals -----------------------------------------------------------------------
    def _position(self, monotonic: float) -> int:
        return max(0, round((monotonic - self._start) * self.rate_hz))

    def _flush(self, final: int, whole_pieces: bool) -> None:
        piece = round(PIECE_SECONDS * self.rate_hz)
        while final - self._written >= piece or (not whole_pieces and final > self._written):
            count = min(piece, final - self._written)
            stereo = np.empty((count, 2), dtype="<i2")
            stereo[:, 0] = self._user.take(count)
            stereo[:, 1] = self._bot.take(count)
            data = stereo.tobytes()
            offset_ms = self._written * 1000 // self.rate_hz
            self._written += count
            if self._wav is not None:
                self._write(data)
            if self.stream_on:
                chunk = common_pb2.AudioChunk(data=data, seq=self._seq, offset_ms=offset_ms)
                self._emit(events.recording_audio(chunk))
                self._seq += 1

    def _write(self, data: bytes) -> None:
        # Small appends to a local file; writeframes also patches the header, so the file
        # is a valid WAV even if the process dies mid-session.
        try:
            self._wav.writeframes(data)
        except OSError as err:  # disk full or gone: stop recording, keep the conversation
            log.warning("recording to %s stopped: %s", self.wav_path, err)
            self._emit(events.error("INTERNAL", f"recording to wav_path stopped: {err.strerror}", "orchestrator"))
            self._close_wav()

    def _close_wav(self) -> None:
        wav, self._wav = self._wav, None
        try:
            wav.close()
        except OSError as err:
            log.warning("closing recording %s failed: %s", self.wav_path, err)
        finally:
            self._file.close()
