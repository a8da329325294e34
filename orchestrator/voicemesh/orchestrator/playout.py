"""Bot audio toward the caller at real-time pace, with a small lead.

Audio leaves at the pace it will be heard, so an interruption can still drop what has
not been played. Markers (bot text as spoken, end of reply) travel in the same queue and
fire when the audio before them has been sent, which is what "as spoken" means here.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from voicemesh.v1 import orchestrator_pb2 as pb

# Chunks of one turn already queued go out together, up to this much audio per message: one
# write instead of several when a TTS streams small chunks (each gRPC message costs CPU).
MERGE_SECONDS = 0.12
# A TTS synthesizes faster than real time; the reply stops reading it while this much audio
# waits to be played, so a long reply holds seconds of audio per session, not all of it (gRPC's
# flow control then pauses the TTS stream). Far above any TTS's lead, so it never delays audio.
MAX_QUEUED_SECONDS = 10.0


@dataclass
class _Audio:
    message: pb.ConverseResponse
    seconds: float
    turn_number: int


@dataclass
class _Marker:
    fire: Callable[[], None]


class _Drained(_Marker):
    """drained()'s marker: fired by clear() too, since nothing queued before it is left to send."""


class Playout:
    def __init__(self, send: Callable[[pb.ConverseResponse], None], lead_seconds: float = 0.25,
                 on_first_audio: Callable[[int], None] = lambda turn_number: None):
        """`on_first_audio(turn_number)`: a reply's first audio is about to leave (bot started speaking)."""
        self._send = send
        self._lead = lead_seconds
        self._items: deque[_Audio | _Marker] = deque()
        self._wake = asyncio.Event()
        self._clock_start: float | None = None  # wall time of the current reply's first sample
        self._sent_seconds = 0.0
        self._generation = 0  # bumped by clear(), so a chunk caught mid-wait is dropped too
        self._waiting = False  # run() holds a chunk until its time comes
        self._seq_turn, self._seq = 0, 0  # BotAudio chunks are numbered per turn, as sent
        self._cleared_turn = 0  # audio of this turn and earlier ones is dropped (they were interrupted)
        self._queued_seconds = 0.0  # audio in _items
        self._room = asyncio.Event()  # set while _queued_seconds <= MAX_QUEUED_SECONDS
        self._room.set()
        self.on_first_audio = on_first_audio

    def audio(self, message: pb.ConverseResponse, seconds: float, turn_number: int) -> None:
        if turn_number <= self._cleared_turn:
            # An interrupted reply's TTS chunk that arrived before its cancellation took effect:
            # sending it would leak audio and start the clock, hiding the next turn's first audio.
            return
        item = _Audio(message, seconds, turn_number)
        # Nothing queued and within the lead (always true of a reply's first chunk): send it
        # now rather than through run()'s task, one event-loop hop sooner.
        if not self._waiting and not self._items and self._delay(item) <= 0:
            self._send_audio(item)
        else:
            self._put(item)

    def marker(self, fire: Callable[[], None]) -> None:
        self._put(_Marker(fire))

    async def room(self) -> None:
        """Wait until the queued audio is back under MAX_QUEUED_SECONDS (the reply's backpressure)."""
        await self._room.wait()

    @property
    def queued_seconds(self) -> float:
        return self._queued_seconds

    def _put(self, item: _Audio | _Marker) -> None:
        self._items.append(item)
        if isinstance(item, _Audio):
            self._account(item.seconds)
        self._wake.set()

    def _account(self, seconds: float) -> None:
        self._queued_seconds = max(0.0, self._queued_seconds + seconds)
        if self._queued_seconds > MAX_QUEUED_SECONDS:
            self._room.clear()
        else:
            self._room.set()

    def clear(self, turn_number: int = 0) -> int:
        """Drop everything not yet sent (barge-in), and any audio of `turn_number` or an earlier
        turn that comes later. Returns how many audio chunks were dropped."""
        self._cleared_turn = max(self._cleared_turn, turn_number)
        dropped = sum(isinstance(item, _Audio) for item in self._items)
        waiting = [item for item in self._items if isinstance(item, _Drained)]
        self._items.clear()
        for item in waiting:  # whoever waits for the queue to drain must not wait forever
            item.fire()
        self._queued_seconds = 0.0
        self._room.set()
        self._clock_start = None
        self._generation += 1
        return dropped

    async def drained(self) -> None:
        """Wait until everything queued so far has been sent."""
        done = asyncio.get_running_loop().create_future()
        self._put(_Drained(lambda: done.done() or done.set_result(None)))
        await done

    async def run(self) -> None:
        while True:
            while not self._items:
                self._wake.clear()
                await self._wake.wait()
            item = self._items.popleft()
            if isinstance(item, _Marker):
                item.fire()
                continue
            self._account(-item.seconds)
            delay = self._delay(item)
            if delay > 0:
                generation = self._generation
                self._waiting = True
                try:
                    await asyncio.sleep(delay)
                finally:
                    self._waiting = False
                if generation != self._generation:
                    continue
            self._send_audio(self._merge_following(item))

    def _merge_following(self, item: _Audio) -> _Audio:
        """`item` plus the chunks of the same turn queued right behind it, up to MERGE_SECONDS."""
        parts, seconds = [item], item.seconds
        while self._items:
            following = self._items[0]
            if not isinstance(following, _Audio) or following.turn_number != item.turn_number \
                    or seconds + following.seconds > MERGE_SECONDS + 1e-6:
                break
            parts.append(self._items.popleft())
            self._account(-following.seconds)
            seconds += following.seconds
        if len(parts) > 1:
            item.message.audio.chunk.data = b"".join(part.message.audio.chunk.data for part in parts)
            item.seconds = seconds
        return item

    def _delay(self, item: _Audio) -> float:
        """Seconds until `item` may leave (the clock runs `lead` ahead of real time)."""
        now = time.monotonic()
        if self._clock_start is None or now > self._clock_start + self._sent_seconds:
            # Starting, or the producer fell behind real time: restart the clock now.
            if self._clock_start is None:
                self.on_first_audio(item.turn_number)
            self._clock_start, self._sent_seconds = now, 0.0
        return self._clock_start + self._sent_seconds - self._lead - now

    def _send_audio(self, item: _Audio) -> None:
        if item.turn_number != self._seq_turn:
            self._seq_turn, self._seq = item.turn_number, 0
        item.message.audio.chunk.seq = self._seq
        self._seq += 1
        self._send(item.message)
        self._sent_seconds += item.seconds

    def reset_clock(self) -> None:
        """The reply is over: the next audio starts a new clock (and a new first-audio event)."""
        self._clock_start = None


class HeldPlayout:
    """Stands in front of a Playout for a speculative reply: holds its audio and markers
    until `release()`, then forwards everything at once and passes new items straight on.
    Both are a seams.ReplySink; this one is also a seams.HeldSink."""

    def __init__(self, playout: Playout):
        self._playout = playout
        self._held: list[tuple] = []
        self._held_seconds = 0.0
        self.released = asyncio.Event()

    def audio(self, message: pb.ConverseResponse, seconds: float, turn_number: int) -> None:
        if self.released.is_set():
            self._playout.audio(message, seconds, turn_number)
        else:
            self._held.append(("audio", message, seconds, turn_number))
            self._held_seconds += seconds

    async def room(self) -> None:
        """While held, the same bound as the playout's: past it, wait for the release (a held
        reply that is dropped instead is cancelled, which ends the wait too)."""
        if not self.released.is_set() and self._held_seconds > MAX_QUEUED_SECONDS:
            await self.released.wait()
        if self.released.is_set():
            await self._playout.room()

    def marker(self, fire: Callable[[], None]) -> None:
        if self.released.is_set():
            self._playout.marker(fire)
        else:
            self._held.append(("marker", fire))

    def release(self) -> None:
        for item in self._held:
            if item[0] == "audio":
                self._playout.audio(*item[1:])
            else:
                self._playout.marker(item[1])
        self._held.clear()
        self._held_seconds = 0.0
        self.released.set()
