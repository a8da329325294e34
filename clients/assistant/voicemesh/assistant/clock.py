"""The assistant's clock: what time it is for the user, and a wait until a moment or a change.

Tools read `now()` (through their Context); the reminder announcer waits with `wait_until`.
Tests pass a clock of their own whose time they move, so nothing waits on real time.
"""
from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

# The longest single wait on the system clock: a machine that slept, or a clock set forward,
# is noticed within this long (asyncio's timers run on the monotonic clock, not the wall's).
LONGEST_WAIT_S = 60.0


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware, in the user's time zone."""

    async def wait_until(self, when: datetime | None, wake: asyncio.Event) -> None:
        """Return at `when` (None: never), or earlier when `wake` is set; the caller looks again."""


class SystemClock:
    def __init__(self, tz: ZoneInfo):
        self.tz = tz

    def now(self) -> datetime:
        return datetime.now(self.tz)

    async def wait_until(self, when: datetime | None, wake: asyncio.Event) -> None:
        seconds = LONGEST_WAIT_S if when is None else min(LONGEST_WAIT_S, (when - self.now()).total_seconds())
        if seconds <= 0:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)


class ManualClock:
    """A clock that moves only when told (`advance`): for tests and scripted runs, where
    reminders must come due without waiting for real time."""

    def __init__(self, start: datetime):
        self.current = start
        self._moved = asyncio.Event()
        self._waiting = asyncio.Event()  # someone waits on this clock, since the last advance

    def now(self) -> datetime:
        return self.current

    async def waited(self) -> None:
        """Until something waits on the clock again (the announcer has done its work)."""
        await self._waiting.wait()

    async def wait_until(self, when: datetime | None, wake: asyncio.Event) -> None:
        if when is not None and when <= self.current:
            return
        self._waiting.set()
        waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(self._moved.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    def advance(self, delta: timedelta) -> None:
        """Move time on and wake every wait, which then looks at the new time."""
        self.current += delta
        self._waiting.clear()
        self._moved.set()
        self._moved = asyncio.Event()
