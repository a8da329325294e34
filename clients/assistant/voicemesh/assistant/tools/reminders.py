"""Reminders and timers: SQLite (<data_dir>/reminders.sqlite3).

The store only knows times; the assistant does the speaking. While a session runs it waits
until `next_due_at()`, speaks each of `due(now)` and marks it announced; when a session starts,
`missed(now)` are those that came due while none ran, to report first. A timer is a reminder
due N seconds from when it was set.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from voicemesh.assistant.toolkit import Context, Tool, ToolError
from voicemesh.assistant.tools.store import connect
from voicemesh.assistant.tools.when import as_json, local_text, parse_datetime, required

SCHEMA_VERSION = 1
# Times are Unix seconds (UTC by definition): they compare and sort whatever the user's zone.
SCHEMA = """
CREATE TABLE IF NOT EXISTS reminders (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('reminder', 'timer')),
    due_at REAL NOT NULL,
    created_at REAL NOT NULL,
    announced_at REAL,
    cancelled_at REAL
);
CREATE INDEX IF NOT EXISTS reminders_pending ON reminders (due_at) WHERE announced_at IS NULL AND cancelled_at IS NULL;
"""
PENDING = "announced_at IS NULL AND cancelled_at IS NULL"
LONGEST_TIMER = timedelta(days=7)


@dataclass(frozen=True)
class Reminder:
    id: int
    text: str
    kind: str  # "reminder" or "timer"
    due_at: datetime  # aware, in the store's zone
    created_at: datetime

    def summary(self, tz: ZoneInfo) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "text": self.text, "at": local_text(self.due_at, tz)}


class Reminders:
    def __init__(self, path: Path, tz: ZoneInfo) -> None:
        self.path, self.tz = Path(path), tz

    def remind(self, text: str, at: datetime, now: datetime) -> Reminder:
        if not text.strip():
            raise ToolError("a reminder needs something to remind of")
        if at <= now:
            raise ToolError(f"{local_text(at, self.tz)} has already passed (it is {local_text(now, self.tz)} now)")
        return self._insert(text.strip(), "reminder", at, now)

    def timer(self, seconds: float, now: datetime, label: str = "") -> Reminder:
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
            raise ToolError("a timer needs a positive number of seconds or minutes")
        if seconds > LONGEST_TIMER.total_seconds():
            raise ToolError("a timer runs for at most 7 days: set a reminder at a time instead")
        return self._insert(label.strip() or "timer", "timer", now + timedelta(seconds=seconds), now)

    def pending(self) -> list[Reminder]:
        """Not yet announced nor cancelled, soonest first (those overdue included)."""
        return self._select(f"{PENDING} ORDER BY due_at, id")

    def due(self, now: datetime) -> list[Reminder]:
        """Come due by `now` and not yet announced: what to speak now."""
        return self._select(f"{PENDING} AND due_at <= ? ORDER BY due_at, id", now.timestamp())

    def missed(self, now: datetime) -> list[Reminder]:
        """At a session's start: those that came due before it, while no session ran to speak them."""
        return self._select(f"{PENDING} AND due_at < ? ORDER BY due_at, id", now.timestamp())

    def next_due_at(self) -> datetime | None:
        """When the soonest pending one is due (maybe already past), or None: what to wait for."""
        with self._db() as db:
            value = db.execute(f"SELECT min(due_at) FROM reminders WHERE {PENDING}").fetchone()[0]
        return None if value is None else self._time(value)

    def mark_announced(self, reminder_id: int, now: datetime | None = None) -> None:
        with self._db() as db:
            db.execute("UPDATE reminders SET announced_at = coalesce(announced_at, ?) WHERE id = ?",
                       ((now or datetime.now(self.tz)).timestamp(), reminder_id))

    def get(self, reminder_id: Any) -> Reminder:
        found = self._select("id = ?", _reminder_id(reminder_id))
        if not found:
            raise ToolError(f"there is no reminder or timer number {reminder_id}")
        return found[0]

    def cancel(self, reminder_id: Any, now: datetime) -> Reminder:
        reminder = self.get(reminder_id)
        with self._db() as db:
            row = db.execute("SELECT announced_at, cancelled_at FROM reminders WHERE id = ?", (reminder.id,)).fetchone()
            if row["cancelled_at"] is not None:
                raise ToolError(f"{reminder.kind} {reminder.id} was already cancelled")
            if row["announced_at"] is not None:
                raise ToolError(f"{reminder.kind} {reminder.id} has already gone off")
            db.execute("UPDATE reminders SET cancelled_at = ? WHERE id = ?", (now.timestamp(), reminder.id))
        return reminder

    def _insert(self, text: str, kind: str, due_at: datetime, now: datetime) -> Reminder:
        with self._db() as db:
            cursor = db.execute("INSERT INTO reminders (text, kind, due_at, created_at) VALUES (?, ?, ?, ?)",
                                (text, kind, due_at.timestamp(), now.timestamp()))
        return self.get(cursor.lastrowid)

    def _select(self, where: str, *values: Any) -> list[Reminder]:
        with self._db() as db:
            rows = db.execute(f"SELECT * FROM reminders WHERE {where}", values).fetchall()
        return [Reminder(row["id"], row["text"], row["kind"], self._time(row["due_at"]), self._time(row["created_at"]))
                for row in rows]

    def _time(self, seconds: float) -> datetime:
        return datetime.fromtimestamp(seconds, self.tz)

    def _db(self):
        return connect(self.path, SCHEMA, SCHEMA_VERSION)


def _reminder_id(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ToolError(f"'{value}' is not a reminder number") from None


def _spoken_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{count} {unit}{'s' if count != 1 else ''}"
             for count, unit in ((hours, "hour"), (minutes, "minute"), (seconds, "second")) if count]
    return " ".join(parts) or "0 seconds"


# -- the tools ----------------------------------------------------------------------------------

def tools(ctx: Context) -> list[Tool]:
    reminders = Reminders(ctx.data_dir / "reminders.sqlite3", ctx.tz)

    def set_reminder(arguments: dict[str, Any]) -> str:
        at = parse_datetime(required(arguments, "at"), ctx.tz, ctx.now(), ahead=True)
        return as_json({"set": reminders.remind(required(arguments, "text"), at, ctx.now()).summary(ctx.tz)})

    def set_timer(arguments: dict[str, Any]) -> str:
        seconds = 0.0
        for name, scale in (("hours", 3600), ("minutes", 60), ("seconds", 1)):
            value = arguments.get(name)
            if value is not None:
                if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                    raise ToolError(f"{name} must be a number, not '{value}'")
                seconds += value * scale
        timer = reminders.timer(seconds, ctx.now(), arguments.get("label") or "")
        return as_json({"set": timer.summary(ctx.tz) | {"duration": _spoken_duration(seconds)}})

    def list_pending(arguments: dict[str, Any]) -> str:
        return as_json({"pending": [reminder.summary(ctx.tz) for reminder in reminders.pending()]})

    def cancel(arguments: dict[str, Any]) -> str:
        return as_json({"cancelled": reminders.cancel(required(arguments, "id"), ctx.now()).summary(ctx.tz)})

    def confirm_cancel(arguments: dict[str, Any]) -> str:
        try:
            reminder = reminders.get(required(arguments, "id"))
        except ToolError:
            return f"Cancel reminder number {arguments.get('id')}?"
        same_day = reminder.due_at.date() == ctx.now().astimezone(ctx.tz).date()
        when = f"{reminder.due_at:%H:%M}" if same_day else local_text(reminder.due_at, ctx.tz)
        return f"Cancel the {reminder.kind} '{reminder.text}' for {when}?"

    return [
        Tool("reminder_set", "Remind the user of something at a date and time (spoken aloud then).",
             {"type": "object", "required": ["text", "at"], "properties": {
                 "text": {"type": "string", "description": "what to remind of"},
                 "at": {"type": "string",
                        "description": "local date and time: YYYY-MM-DDTHH:MM, 'tomorrow 9:00', or HH:MM (the next one)"}}},
             set_reminder),
        Tool("timer_set", "Start a countdown timer. Put the number in the unit the user said: "
             "'ten seconds' is seconds=10, 'five minutes' is minutes=5; leave the other units out.",
             {"type": "object", "properties": {
                 "hours": {"type": "number"}, "minutes": {"type": "number"}, "seconds": {"type": "number"},
                 "label": {"type": "string", "description": "what it is for, e.g. 'pasta'"}}},
             set_timer),
        Tool("reminders_list", "List the reminders and timers that have not gone off yet.",
             {"type": "object", "properties": {}}, list_pending),
        Tool("reminder_cancel", "Cancel a reminder or timer by its number.",
             {"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}},
             cancel, confirm=confirm_cancel),
    ]
