"""The llama.cpp provider's queue for its generation slots, without a model: a stub holds the
slot, and the tests drive the waiting request through its states (test_llm.py has the model)."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from voicemesh.llm.providers import llamacpp
from voicemesh.llm.providers.base import Queued
from voicemesh.llm.providers.llamacpp import LlamaCppLlmProvider

DEADLINE_S = 120  # for a state the provider must reach (at once when idle); never a speed claim


class CountingClock:
    """Stands in for the provider module's `time`: real readings, counted, so a test can wait until
    the waiting request has looked at the clock n times (each heartbeat round looks once)."""

    def __init__(self) -> None:
        self.readings = 0
        self._wanted: list[tuple[int, asyncio.Event]] = []

    def monotonic(self) -> float:
        self.readings += 1
        for count, event in self._wanted:
            if self.readings >= count:
                event.set()
        return time.monotonic()

    async def readings_reach(self, count: int, what: str) -> None:
        event = asyncio.Event()
        self._wanted.append((count, event))
        if self.readings >= count:
            event.set()
        try:
            await asyncio.wait_for(event.wait(), DEADLINE_S)
        except TimeoutError:
            raise AssertionError(f"not {what} after {DEADLINE_S} s: {self.readings} clock readings") from None


class WatchedSlots(asyncio.Semaphore):
    """The provider's slots, with an event set each time an acquire completes."""

    def __init__(self) -> None:
        super().__init__(1)
        self.acquired = asyncio.Event()

    async def acquire(self) -> bool:
        await super().acquire()
        self.acquired.set()
        return True


async def until_set(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), DEADLINE_S)
    except TimeoutError:
        raise AssertionError(f"not {what} after {DEADLINE_S} s") from None


async def test_requests_behind_a_generation_that_makes_no_progress_stop_saying_queued(monkeypatch):
    """No model: the one slot is held by a "generation" that has produced nothing for longer than
    HOLDER_STALL_S. A request behind it says Queued once, as its wait begins, then nothing, so the
    caller's watchdog can give it up; when the holder makes progress again, the heartbeats resume."""
    monkeypatch.setattr(llamacpp, "QUEUED_EVERY_S", 0.01)
    clock = CountingClock()
    monkeypatch.setattr(llamacpp, "time", clock)
    provider = LlamaCppLlmProvider()
    await provider._slots.acquire()
    provider._progress_at = time.monotonic() - llamacpp.HOLDER_STALL_S - 1
    seen: list[Queued] = []
    another = asyncio.Event()  # set at each Queued after the first

    async def wait() -> None:
        async with contextlib.aclosing(provider._take_slot()) as waits:
            async for waiting in waits:
                seen.append(waiting)
                if len(seen) > 1:
                    another.set()

    start = clock.readings
    task = asyncio.create_task(wait())
    try:
        # Two readings as the wait begins (its start, the first Queued's time), then one a round.
        await clock.readings_reach(start + 2 + 5, "five heartbeat rounds")
        assert [w.ahead for w in seen] == [0], seen  # the first, then silence
        provider._progress_at = time.monotonic() + DEADLINE_S  # the holder is making progress
        await until_set(another, "a heartbeat once the holder progressed")
        provider._slots.release()  # the holder is done: the waiter takes the slot
        await asyncio.wait_for(task, DEADLINE_S)
        assert provider._slots.locked() and not provider._waiting
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_provider_stops_serving_while_a_generation_makes_no_progress():
    """No model: the health probe fails while a running generation has produced nothing for
    HOLDER_STALL_S (a hung llama.cpp call never frees its slot), and passes otherwise."""
    provider = LlamaCppLlmProvider()
    assert await provider.probe() is None  # idle
    running = asyncio.get_running_loop().create_future()
    provider._running[running] = threading.Event()
    try:
        provider._progress_at = time.monotonic()
        assert await provider.probe() is None  # generating
        provider._progress_at = time.monotonic() - llamacpp.HOLDER_STALL_S - 1
        reason = await provider.probe()
        assert reason and "produced nothing" in reason, reason
    finally:
        running.cancel()
        provider._running.clear()


async def test_a_waiter_given_the_slot_as_it_gives_up_hands_the_slot_back():
    """No model: the slot is freed, the waiter's acquire completes, and the waiter is closed before
    it has resumed: the slot goes back instead of being held by nobody."""
    provider = LlamaCppLlmProvider()
    provider._slots = slots = WatchedSlots()
    await slots.acquire()
    slots.acquired.clear()
    waits = provider._take_slot()
    assert isinstance(await anext(waits), Queued)
    provider._slots.release()
    await until_set(slots.acquired, "the waiter's acquire done")  # the waiter has not resumed yet
    await waits.aclose()
    assert not provider._slots.locked()  # handed back: the next request takes it at once
    assert [event async for event in provider._take_slot()] == []
