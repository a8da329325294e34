"""Speaking reminders and timers as they come due, while a session runs.

The store (tools/reminders.py) only knows times. The announcer waits until its
`next_due_at()`, or until `changed()` says the store may have a sooner one (a tool ran), then
speaks everything `due(now)` with one Converse `say` and marks each announced. At the start of
a session it reports those that came due while no session ran (`missed(now)`).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from voicemesh.assistant.clock import Clock


class ReminderStore(Protocol):
    def due(self, now: datetime) -> Sequence[Any]: ...
    def missed(self, now: datetime) -> Sequence[Any]: ...
    def next_due_at(self) -> datetime | None: ...
    def mark_announced(self, reminder_id: int, now: datetime | None = None) -> None: ...


def announcement(reminders: Sequence[Any], missed: bool = False) -> str:
    """What the bot says for reminders (objects with id, text, kind, due_at)."""
    parts = []
    for reminder in reminders:
        if reminder.kind == "timer":
            label = "" if reminder.text == "timer" else f"{reminder.text} "
            what = f"your {label}timer went off" if missed else f"your {label}timer is done"
        else:
            what = f"you wanted to be reminded: {reminder.text}"
        parts.append(f"at {reminder.due_at:%H:%M}, {what}" if missed else what)
    text = "; ".join(parts)
    return f"While you were away: {text}." if missed else f"{text[0].upper()}{text[1:]}."


class Announcer:
    def __init__(self, store: ReminderStore, clock: Clock, say: Callable[[str], Awaitable[bool]]):
        """`say(text)` speaks (waiting until the bot may speak) and returns whether it was sent."""
        self.store, self.clock, self.say = store, clock, say
        self._changed = asyncio.Event()

    def changed(self) -> None:
        """The store may have changed (a reminder set or cancelled): look again."""
        self._changed.set()

    async def report_missed(self) -> None:
        missed = await asyncio.to_thread(self.store.missed, self.clock.now())
        if missed and await self.say(announcement(missed, missed=True)):
            await self._mark(missed)

    async def run(self) -> None:
        """Until cancelled: wait for the next one due, speak it, mark it."""
        while True:
            self._changed.clear()  # before looking: a change from here on wakes the wait below
            due = await asyncio.to_thread(self.store.due, self.clock.now())
            if due:
                if not await self.say(announcement(due)):
                    return  # the session is over
                await self._mark(due)
                continue
            await self.clock.wait_until(await asyncio.to_thread(self.store.next_due_at), self._changed)

    async def _mark(self, reminders: Sequence[Any]) -> None:
        now = self.clock.now()
        for reminder in reminders:
            await asyncio.to_thread(self.store.mark_announced, reminder.id, now)
