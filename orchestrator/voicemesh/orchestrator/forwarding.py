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
  only keeps that audio as the next turn's pre-roll); the urgent quiet frames go to it at
  once too, as its pause decode (and the reply started on it) waits on the same pause. Before a turn start everything is
  flushed, and before a Finalize whatever may still hold speech, so the transcripts cover
  every word the VAD has heard.

Reopening (`StreamLink`): each stream is held by a link whose call the session replaces when
its backend dies or hangs. The last REPLAY_MS of caller audio is kept (`CallerAudio.replay`),
so the new call can be given the turn in progress again; offsets on the new call count from
its own first sample (`base_samples` in the session's frame). `StreamKeeper` (a base of the
Session) reads each stream for the whole session and does the reopening, bounded.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from dataclasses import dataclass

import grpc
import numpy as np

from voicemesh.orchestrator import events
from voicemesh.v1 import common_pb2, stt_pb2, vad_pb2

log = logging.getLogger("voicemesh.session")

VAD_PIECE_MS = 40
STT_SPEECH_MS = 100
STT_IDLE_MS = 500
URGENT_MARGIN_MS = 100  # quiet frames are urgent from this long before the stop wait ends
QUIET_RMS = 300.0  # int16 RMS of a 20 ms frame (about -40 dBFS) below which it may be the pause
ARRIVALS_KEPT = 4000  # (offset, time) pairs: about a minute of 20 ms frames, plenty to time a turn
REPLAY_MS = 15_000  # caller audio kept for a reopened stream: 480 KB per session at 16 kHz PCM16
WRITE_STALL_S = 5.0  # a write that waits this long (flow control: nobody reads) means a hung service
REOPEN_ATTEMPTS = 5  # reopens of a VAD or STT call per outage; then the session ends (fatal Error)
REOPEN_BACKOFF_S = (0.0, 0.25, 0.5, 1.0, 2.0)  # before each attempt: an outage gives up within about 4 s
REOPEN_CONFIRM_S = 2.0  # a reopened call that lives this long ends the outage (and the client is told)
REPLAY_PREROLL_MS = {"vad": 300, "stt": 500}  # audio before the speech start given to a reopened call
REPLAY_PIECE_MS = 500  # replayed audio in 500 ms messages (services refuse over 1 s)
# Codes that say the request itself is wrong: reopening would fail the same way, so they end the session.
# RESOURCE_EXHAUSTED is not one: a service at its own cap (or a stream that fell behind) says "not now,
# not here", and the reopen may land on another replica, or on this one once it has room.
FATAL_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED,
               grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.OUT_OF_RANGE}
AT_CAPACITY = "RESOURCE_EXHAUSTED"  # an outage whose attempts run out on this code waits for room instead of ending




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
        self._history: deque[tuple[int, np.ndarray]] = deque()  # (start offset in samples, samples)
        self._history_samples = 0

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
        self._keep(samples)
        self.vad.add(samples)
        self.stt.add(samples)
        quiet = user_speaking and _quiet(samples)
        self.quiet_run_ms = self.quiet_run_ms + len(samples) * 1000 / self.rate_hz if quiet else 0.0
        urgent = quiet and self.quiet_run_ms >= self.urgent_after_ms
        if urgent:
            await self.vad.flush()  # it may complete the pause
        elif self.vad.holds_ms() >= VAD_PIECE_MS:
            await self.vad.flush(urgent=False)
        if urgent or self.stt.holds_ms() >= (STT_SPEECH_MS if user_speaking else STT_IDLE_MS):
            await self.stt.flush()

    async def flush_stt(self, speech_end_ms: int | None = None) -> None:
        """Before a turn start (everything) or a Finalize (the speech up to `speech_end_ms`):
        the STT must have heard it. Only silence after the speech still waiting costs no write."""
        if speech_end_ms is None or self.stt.sent_samples < speech_end_ms * self.rate_hz // 1000:
            await self.stt.flush()

    async def flush(self) -> None:
        await self.vad.flush()
        await self.stt.flush()

    def _keep(self, samples: np.ndarray) -> None:
        self._history.append((self.received_samples - len(samples), samples))
        self._history_samples += len(samples)
        limit = REPLAY_MS * self.rate_hz // 1000
        while self._history_samples - len(self._history[0][1]) >= limit:
            self._history_samples -= len(self._history.popleft()[1])

    def replay(self, start: int, end: int) -> tuple[int, bytes]:
        """The caller audio from sample `start` (or the oldest kept) to `end`: (its first sample, PCM16)."""
        pieces, first = [], None
        for begin, samples in self._history:
            lo, hi = max(start, begin), min(end, begin + len(samples))
            if lo < hi:
                first = lo if first is None else first
                pieces.append(samples[lo - begin : hi - begin])
        return (first if first is not None else end), b"".join(piece.tobytes() for piece in pieces)

    def arrival_time(self, offset_ms: int) -> float:
        """When the audio at stream offset `offset_ms` reached the orchestrator."""
        sample = offset_ms * self.rate_hz // 1000
        index = bisect.bisect_left(self._arrivals, (sample, 0.0))
        if index >= len(self._arrivals):
            return time.monotonic()
        return self._arrivals[index][1]


def _broken_call_error(err: BaseException) -> bool:
    """A write that failed because the call is gone (the reader learns why), not our own cancellation."""
    if isinstance(err, asyncio.CancelledError):  # grpc.aio raises it for a write on a cancelled call
        task = asyncio.current_task()
        return task is not None and not task.cancelling()
    return isinstance(err, (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, TimeoutError))


class StreamLink:
    """A session-long VAD or STT stream (seams.ServiceStream) whose call can be replaced.

    Writes never raise for a call that is gone: the session's reader sees the call end and
    reopens it, and what was lost is replayed from CallerAudio. While a reopen runs, writes
    wait (`hold`/`resume`), so the new call gets its config and replay first. A write stuck
    WRITE_STALL_S (the service stopped reading) abandons the call: a hung service."""

    def __init__(self, kind: str, call, rate_hz: int):
        self.kind, self.call, self.rate_hz = kind, call, rate_hz
        self.written_samples = 0  # audio written so far, in the session's frame
        self.base_samples = 0  # the session offset of the current call's first sample
        self.turn_start = None  # the last TurnContext written (session frame), and Finalizes since
        self.finalizes = 0
        self.reason: tuple[str, str] | None = None  # (code, details) when the session gave up on the call
        self._ready = asyncio.Event()
        self._ready.set()

    def offset_ms(self, session_ms: int) -> int:
        """A session offset in the current call's frame."""
        return max(0, session_ms - self.base_samples * 1000 // self.rate_hz)

    def session_ms(self, call_ms: int) -> int:
        """An offset the current call reported, in the session's frame."""
        return call_ms + self.base_samples * 1000 // self.rate_hz

    async def write(self, message, urgent: bool = True) -> None:
        if not self._ready.is_set():
            await self._ready.wait()
        kind = message.WhichOneof("request")
        if kind == "audio":
            self.written_samples += len(message.audio.data) // 2
        elif kind in ("turn_start", "turn"):
            self.turn_start, self.finalizes = type(getattr(message, kind))(), 0
            self.turn_start.CopyFrom(getattr(message, kind))
            getattr(message, kind).audio_offset_ms = self.offset_ms(self.turn_start.audio_offset_ms)
        elif kind == "finalize":
            self.finalizes += 1
        call = self.call
        try:
            async with asyncio.timeout(WRITE_STALL_S):
                await call.write(message, urgent)
        except BaseException as err:
            if not _broken_call_error(err):
                raise
            if isinstance(err, TimeoutError) and call is self.call:
                self.abandon("DEADLINE_EXCEEDED", f"a write waited {WRITE_STALL_S:.0f} s: the service stopped reading")

    def abandon(self, code: str, details: str) -> None:
        """Give up on the current call (hung); its reader ends and the session reopens it."""
        if self.reason is None:
            self.reason = (code, details)
        self.call.cancel()

    def hold(self) -> None:
        self._ready.clear()

    def resume(self, call, base_samples: int) -> None:
        self.call, self.base_samples, self.reason = call, base_samples, None
        self._ready.set()

    def __aiter__(self):
        return self.call.__aiter__()

    def cancel(self) -> bool:
        self._ready.set()
        return self.call.cancel()

    def done(self) -> bool:
        return self.call.done()

    def cancelled(self) -> bool:
        return self.call.cancelled()


class StreamFailed(Exception):
    """A VAD or STT stream is gone for good: the session ends with a fatal Error."""

    def __init__(self, source: str, code: str, details: str):
        super().__init__(f"{source}: {code} {details}")
        self.source, self.code, self.details = source, code, details


@dataclass
class Outage:
    code: str
    details: str
    since: float
    attempts: int = 0
    confirm_at: float | None = None
    replayed: str = ""
    waiting_for_room: bool = False  # the attempts ran out on AT_CAPACITY: the client was told, and it goes on


class StreamKeeper:
    """Base of Session: keeps its VAD and STT streams for the whole session (see the module
    docstring and docs/reliability.md). Uses the Session's links, clients, controller, caller
    audio, `_open_call`, `_stream_config`, `emit`, `tracing` and `clock`."""

    async def _keep(self, link: StreamLink, handle) -> None:
        """Read one session-long stream for the whole session, reopening its call when it fails."""
        while True:
            code, details = "UNAVAILABLE", f"the {link.kind} service ended the stream"
            try:
                async for response in link.call:
                    await handle(response)
            except grpc.aio.AioRpcError as err:
                if err.code() in FATAL_CODES or getattr(link.call, "gave_up", False):  # gave_up: mux.MultiplexedStream
                    raise StreamFailed(link.kind, err.code().name, err.details()) from None
                code, details = err.code().name, err.details()
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # the session is ending
                # else grpc.aio's way of ending the iteration of a call we cancelled (abandon)
            code, details = link.reason or (code, details)
            await self._reopen(link, code, details)

    async def _reopen(self, link: StreamLink, code: str, details: str) -> None:
        outage = self._outages.get(link.kind)
        if outage is None:
            outage = self._outages[link.kind] = Outage(code, details, self.clock())
            log.warning("session %s: the %s stream failed (%s: %s); reopening it", self.session_id, link.kind, code, details)
        if outage.attempts >= REOPEN_ATTEMPTS:
            if code != AT_CAPACITY:
                raise StreamFailed(link.kind, code, f"{details} (the stream was reopened {outage.attempts} times in "
                                                    f"{self.clock() - outage.since:.1f} s; giving up)")
            self._wait_for_room(link.kind, outage, details)
        await asyncio.sleep(REOPEN_BACKOFF_S[min(outage.attempts, REOPEN_ATTEMPTS - 1)])
        outage.attempts += 1
        call = self._open_call(link.kind)
        base, replay, outage.replayed = self._replay(link)
        link.hold()  # writes wait: the new call gets its config and the replay first
        try:
            # Bounded like every write: the new call may land on a replica that hangs too.
            async with asyncio.timeout(WRITE_STALL_S):
                for message in (self._stream_config(link.kind), *replay):
                    await call.write(message)
        except TimeoutError:
            call.cancel()  # its reader ends, and the next attempt follows
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the new call failed already: its reader sees why, and the next attempt follows
        finally:
            link.resume(call, base)
        outage.confirm_at = self.clock() + REOPEN_CONFIRM_S

    def _wait_for_room(self, kind: str, outage: Outage, details: str) -> None:
        """Every replica refused the stream for capacity: the session goes on (typed turns need
        no VAD or STT) and tries again every REOPEN_BACKOFF_S[-1]; the client is told once, and
        again when the stream is back. A failure with another code from here on ends the session."""
        outage.code = AT_CAPACITY
        if outage.waiting_for_room:
            return
        outage.waiting_for_room = True
        message = (f"the {kind} service refused the stream: it is at capacity ({AT_CAPACITY}: {details}); it was reopened "
                   f"{outage.attempts} times in {self.clock() - outage.since:.1f} s; the session goes on without "
                   f"spoken input (typed input still works) and tries again every {REOPEN_BACKOFF_S[-1]:g} s")
        log.warning("session %s: %s", self.session_id, message)
        self.tracing.error(AT_CAPACITY, kind)
        self.emit(events.error(AT_CAPACITY, message, kind, fatal=False))

    def _replay(self, link: StreamLink) -> tuple[int, list, str]:
        """What a reopened call is given again: (its first sample in the session's frame, the
        messages, what the client is told). The STT gets the turn still waiting for it; the VAD
        the speech in progress, so that it hears it start and, later, stop."""
        written, turns, context = link.written_samples, self.controller.turns, link.turn_start
        if link.kind == "stt":
            turn = self.stt_turn
            waiting = turn is not None and context is not None and context.turn_id == turn.turn_id and (
                turn.turn_id in turns.awaiting or (not turn.ended and not turn.replying
                                                    and (turn.pending_finals or turns.user_speaking)))
        else:
            waiting = turns.user_speaking and context is not None
        if not waiting:
            return written, [], "no turn was waiting for it"
        speech = context.audio_offset_ms * self.caller_audio.rate_hz // 1000
        first, data = self.caller_audio.replay(speech - REPLAY_PREROLL_MS[link.kind] * self.caller_audio.rate_hz // 1000, written)
        wrap = (lambda c: stt_pb2.RecognizeRequest(audio=c)) if link.kind == "stt" else (lambda c: vad_pb2.DetectRequest(audio=c))
        step = REPLAY_PIECE_MS * self.caller_audio.rate_hz // 1000 * 2
        messages = [wrap(common_pb2.AudioChunk(data=data[i : i + step])) for i in range(0, len(data), step)]
        seconds = len(data) / (2 * self.caller_audio.rate_hz)
        kept = "" if first <= max(0, speech) else " (only its last part: older audio is not kept)"
        if link.kind == "vad":
            self._skip_vad_start = True
            return first, messages, f"the speech in progress ({seconds:.1f} s) was given to it again{kept}"
        moved = common_pb2.TurnContext()
        moved.CopyFrom(context)
        moved.audio_offset_ms = max(0, context.audio_offset_ms - first * 1000 // self.caller_audio.rate_hz)
        messages.append(stt_pb2.RecognizeRequest(turn_start=moved))
        finalize = stt_pb2.RecognizeRequest(finalize=stt_pb2.Finalize(turn_id=context.turn_id))
        messages.extend([finalize] * min(self.stt_turn.pending_finals, link.finalizes))
        return first, messages, f"turn {context.turn_number} ({seconds:.1f} s of speech) was given to it again{kept}"

    def _confirm_reopened(self) -> None:
        """An outage ends when its reopened call has held REOPEN_CONFIRM_S: the client is told."""
        for kind, outage in list(self._outages.items()):
            link = self.vad_call if kind == "vad" else self.stt_call
            if outage.confirm_at is None or self.clock() < outage.confirm_at or link.done():
                continue
            if not getattr(link.call, "proven", True):  # a multiplexed call that has not answered yet (mux.py)
                continue
            del self._outages[kind]
            message = (f"the {kind} stream failed ({outage.code}: {outage.details}); it was reopened "
                       f"({outage.attempts} attempt{'s' if outage.attempts > 1 else ''}, "
                       f"{outage.confirm_at - REOPEN_CONFIRM_S - outage.since:.2f} s) and the session goes on; {outage.replayed}")
            log.warning("session %s: %s", self.session_id, message)
            self.tracing.error(outage.code, kind)
            self.emit(events.error(outage.code, message, kind, fatal=False))
