"""The user's calendar: one iCalendar file (<data_dir>/calendar.ics), read and written with icalendar.

New events are stored with the user's TZID (and its VTIMEZONE) or in UTC when the zone is UTC;
events other programs wrote may be floating (read as local), in any zone, or all-day. Recurring
events (RRULE, RDATE) are expanded into their occurrences by recurring-ical-events, which honours
EXDATE and the overrides (RECURRENCE-ID) other programs write; such a series cannot be moved or
cancelled from here yet (one occurrence neither). Every write goes to a temporary file renamed
over the old one, so a crash never leaves half a calendar.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import recurring_ical_events

from voicemesh.assistant.toolkit import Context, Tool, ToolError
from voicemesh.assistant.tools.when import as_json, local_text, parse_date, parse_datetime, parse_time, required, spoken_day

PRODID = "-//voicemesh//assistant//EN"


@dataclass(frozen=True)
class Event:
    uid: str
    title: str
    start: datetime  # aware, in the calendar's zone; midnight for all-day events
    end: datetime
    all_day: bool = False
    location: str = ""
    recurring: bool = False  # an occurrence of a series (or the series itself)

    def summary(self, tz: ZoneInfo) -> dict[str, Any]:
        shown = {"id": self.uid, "title": self.title}
        if self.all_day:
            shown |= {"date": self.start.date().isoformat(), "all_day": True}
            if self.end.date() - self.start.date() > timedelta(days=1):
                shown["last_date"] = (self.end.date() - timedelta(days=1)).isoformat()
        else:
            shown |= {"start": local_text(self.start, tz), "end": local_text(self.end, tz)}
        if self.location:
            shown["location"] = self.location
        if self.recurring:
            shown["repeats"] = True
        return shown


class Calendar:
    def __init__(self, path: Path, tz: ZoneInfo) -> None:
        self.path, self.tz = Path(path), tz

    # -- reading --------------------------------------------------------------------------------

    def events(self) -> list[Event]:
        """Each stored event once, a series by its first occurrence (not expanded: it may never end)."""
        by_uid: dict[str, Event] = {}
        for item in _dated(self._load()).walk("VEVENT"):
            event = self._event(item)
            if event.uid not in by_uid or "recurrence-id" not in item:  # a series' own VEVENT, not an override
                by_uid[event.uid] = event
        return sorted(by_uid.values(), key=lambda event: event.start)

    def between(self, start: datetime, end: datetime) -> list[Event]:
        """Events overlapping [start, end), each occurrence of a series on its own; an event with
        no length counts where it starts."""
        # A day wider on each side, then the exact test below: floating and all-day events are
        # read in the user's zone here, which the library need not do the same way.
        margin = timedelta(days=1)
        try:
            calendar = _dated(self._load())
            items = recurring_ical_events.of(calendar).between(start - margin, end + margin)
        except (ValueError, TypeError, KeyError) as error:  # a series whose rule cannot be read
            raise ToolError(f"a recurring event in {self.path.name} cannot be read: {error}") from None
        # The library gives every occurrence a RECURRENCE-ID, single events too: the file says which repeat.
        series = {str(item.get("uid")) for item in calendar.walk("VEVENT") if _repeats(item)}
        found = [self._event(item, str(item.get("uid")) in series) for item in items]
        found = [event for event in found if event.start < end and (event.end > start or event.start >= start)]
        return sorted(found, key=lambda event: event.start)

    def on(self, day: date) -> list[Event]:
        return self.between(*self._day_bounds(day))

    def find(self, query: str, day: date | None = None) -> Event:
        """The one event whose id is `query` or whose title contains it (on `day`, if given)."""
        candidates = self.on(day) if day else self.events()
        exact = [event for event in candidates if event.uid == query]
        matches = exact or [event for event in candidates if query.lower() in event.title.lower()]
        where = f" on {spoken_day(day)}" if day else ""
        if not matches:
            raise ToolError(f"no event matches '{query}'{where}")
        if len(matches) > 1:
            listed = "; ".join(f"{event.title} at {local_text(event.start, self.tz)}" for event in matches[:5])
            raise ToolError(f"{len(matches)} events match '{query}'{where}: {listed}. Give the date or the event's id.")
        return matches[0]

    def free_slots(self, day: date, day_start: time = time(8), day_end: time = time(20)) -> list[tuple[datetime, datetime]]:
        """The gaps between timed events on `day`, within [day_start, day_end). All-day events
        (holidays, birthdays) do not make the user busy."""
        window_start = datetime.combine(day, day_start, tzinfo=self.tz)
        window_end = datetime.combine(day, day_end, tzinfo=self.tz)
        if window_end <= window_start:
            raise ToolError("the end of the day must come after its start")
        slots, cursor = [], window_start
        for event in self.between(window_start, window_end):
            if event.all_day or event.end <= event.start:  # a point in time takes no time
                continue
            if event.start > cursor:
                slots.append((cursor, min(event.start, window_end)))
            cursor = max(cursor, event.end)
        if cursor < window_end:
            slots.append((cursor, window_end))
        return slots

    # -- writing --------------------------------------------------------------------------------

    def schedule(self, title: str, start: datetime | date, end: datetime | date, location: str = "",
                 now: datetime | None = None) -> Event:
        """A timed event (datetimes), or an all-day one (dates; `end` is the day after the last)."""
        if not title.strip():
            raise ToolError("an event needs a title")
        if end <= start:
            raise ToolError("an event must end after it starts")
        calendar = self._load()
        item = icalendar.Event()
        item.add("uid", f"{uuid.uuid4()}@voicemesh")
        item.add("dtstamp", (now or datetime.now(self.tz)).astimezone(ZoneInfo("UTC")))
        item.add("summary", title.strip())
        timed = isinstance(start, datetime)
        item.add("dtstart", self._stored(start) if timed else start)
        item.add("dtend", self._stored(end) if timed else end)
        if location:
            item.add("location", location)
        calendar.add_component(item)
        self._save(calendar)
        return self._event(item)

    def move(self, uid: str, new_start: datetime, new_end: datetime | None = None) -> Event:
        """Move an event, keeping its length unless a new end is given."""
        calendar = self._load()
        item = self._component(calendar, uid)
        old = self._event(item)
        end = new_end or new_start + (old.end - old.start)
        if end <= new_start:
            raise ToolError("an event must end after it starts")
        for name in ("dtstart", "dtend", "duration"):
            item.pop(name, None)
        if old.all_day:  # stays all-day: only its date moves
            item.add("dtstart", new_start.date())
            item.add("dtend", new_start.date() + (old.end.date() - old.start.date()))
        else:
            item.add("dtstart", self._stored(new_start))
            item.add("dtend", self._stored(end))
        item["sequence"] = int(item.get("sequence", 0)) + 1
        self._save(calendar)
        return self._event(item)

    def cancel(self, uid: str) -> Event:
        calendar = self._load()
        item = self._component(calendar, uid)
        calendar.subcomponents.remove(item)
        self._save(calendar)
        return self._event(item)

    # -- the file -------------------------------------------------------------------------------

    def _load(self) -> icalendar.Calendar:
        try:
            return icalendar.Calendar.from_ical(self.path.read_bytes())
        except FileNotFoundError:
            calendar = icalendar.Calendar()
            calendar.add("prodid", PRODID)
            calendar.add("version", "2.0")
            return calendar
        except ValueError as error:
            raise ToolError(f"the calendar file {self.path.name} cannot be read: {error}") from None

    def _save(self, calendar: icalendar.Calendar) -> None:
        calendar.add_missing_timezones()  # a TZID needs its VTIMEZONE for other programs
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".calendar-", suffix=".ics")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(calendar.to_ical())
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _component(self, calendar: icalendar.Calendar, uid: str) -> icalendar.Event:
        """The event to change; a series (or one of its occurrences) is refused, as its rules and
        overrides are kept by the program that made it."""
        items = [item for item in calendar.walk("VEVENT") if str(item.get("uid")) == uid]
        if not items:
            raise ToolError(f"no event has the id '{uid}'")
        if any(_repeats(item) for item in items):
            title = next((str(item["summary"]) for item in items if "summary" in item), uid)
            raise ToolError(f"'{title}' is a recurring event: a series, or one of its occurrences, cannot be moved or "
                            "cancelled from here yet. Change it in the calendar program that made it.")
        return items[0]

    def _stored(self, moment: datetime) -> datetime:
        """In the user's zone (written with its TZID), or UTC (written with Z) when that is the zone."""
        return moment.astimezone(ZoneInfo("UTC") if self.tz.key in ("UTC", "Etc/UTC") else self.tz)

    def _day_bounds(self, day: date) -> tuple[datetime, datetime]:
        return datetime.combine(day, time(), tzinfo=self.tz), datetime.combine(day + timedelta(days=1), time(), tzinfo=self.tz)

    def _event(self, item: icalendar.Event, recurring: bool | None = None) -> Event:
        start, end = item.decoded("dtstart"), None
        try:
            end = item.end
        except Exception:  # an event without DTEND or DURATION: a point in time (or one day)
            end = None
        all_day = not isinstance(start, datetime)
        if all_day:
            end = end if isinstance(end, date) and not isinstance(end, datetime) and end > start else start + timedelta(days=1)
            start, end = (datetime.combine(value, time(), tzinfo=self.tz) for value in (start, end))
        else:
            start = self._aware(start)
            end = self._aware(end) if isinstance(end, datetime) else start
        return Event(str(item.get("uid", "")), str(item.get("summary", "")), start, end, all_day,
                     str(item.get("location", "")), _repeats(item) if recurring is None else recurring)

    def _aware(self, moment: datetime) -> datetime:
        """Floating times (no TZID, no Z) are the user's wall time."""
        return moment.replace(tzinfo=self.tz) if moment.tzinfo is None else moment.astimezone(self.tz)


def _repeats(item: icalendar.Event) -> bool:
    """A stored series (RRULE, RDATE) or an override of one of its occurrences (RECURRENCE-ID)."""
    return any(name in item for name in ("rrule", "rdate", "recurrence-id"))


def _dated(calendar: icalendar.Calendar) -> icalendar.Calendar:
    """The calendar without its VEVENTs that have no DTSTART (RFC 5545 allows them; they are on
    no day, and recurring-ical-events cannot read them)."""
    kept = icalendar.Calendar(calendar)  # its properties; the components are chosen below
    kept.subcomponents = [item for item in calendar.subcomponents if item.name != "VEVENT" or "dtstart" in item]
    return kept


def _is_day(text: str) -> bool:
    """A date with no time of day: 'YYYY-MM-DD', 'tomorrow', 'friday'."""
    try:
        parse_date(text, date.today())
    except ToolError:
        return False
    return True


# -- the tools ----------------------------------------------------------------------------------

def tools(ctx: Context) -> list[Tool]:
    calendar = Calendar(ctx.data_dir / "calendar.ics", ctx.tz)

    def today() -> date:
        return ctx.now().astimezone(ctx.tz).date()

    def optional_day(arguments: dict[str, Any]) -> date | None:
        return parse_date(arguments["date"], today()) if arguments.get("date") else None

    def list_events(arguments: dict[str, Any]) -> str:
        first = parse_date(arguments.get("date") or "today", today())
        last = parse_date(arguments["end_date"], today()) if arguments.get("end_date") else first
        if last < first:
            raise ToolError("end_date comes before date")
        if (last - first).days > 62:
            raise ToolError("ask for at most two months at a time")
        start = datetime.combine(first, time(), tzinfo=ctx.tz)
        found = calendar.between(start, datetime.combine(last + timedelta(days=1), time(), tzinfo=ctx.tz))
        return as_json({"from": first.isoformat(), "to": last.isoformat(), "events": [event.summary(ctx.tz) for event in found]})

    def add_event(arguments: dict[str, Any]) -> str:
        if _is_day(required(arguments, "start")):  # a date alone: an all-day event (birthdays, holidays)
            first = parse_date(arguments["start"], today())
            last = parse_date(arguments["end"], today()) if arguments.get("end") else first
            title, location = required(arguments, "title"), arguments.get("location") or ""
            event = calendar.schedule(title, first, last + timedelta(days=1), location, ctx.now())
            return as_json({"scheduled": event.summary(ctx.tz)})
        start = parse_datetime(arguments["start"], ctx.tz, ctx.now())
        if arguments.get("end"):
            end = parse_datetime(arguments["end"], ctx.tz, ctx.now())
        else:
            minutes = arguments.get("duration_minutes", 60)
            if not isinstance(minutes, int | float) or minutes <= 0:
                raise ToolError("duration_minutes must be a positive number")
            end = start + timedelta(minutes=minutes)
        event = calendar.schedule(required(arguments, "title"), start, end, arguments.get("location") or "", ctx.now())
        return as_json({"scheduled": event.summary(ctx.tz)})

    def move_event(arguments: dict[str, Any]) -> str:
        event = calendar.find(required(arguments, "event"), optional_day(arguments))
        if _is_day(required(arguments, "new_start")):  # another day, at the same time of day
            day = parse_date(arguments["new_start"], today())
            new_start = datetime.combine(day, event.start.astimezone(ctx.tz).time(), tzinfo=ctx.tz)
        else:
            new_start = parse_datetime(arguments["new_start"], ctx.tz, ctx.now())
        new_end = parse_datetime(arguments["new_end"], ctx.tz, ctx.now()) if arguments.get("new_end") else None
        return as_json({"moved": calendar.move(event.uid, new_start, new_end).summary(ctx.tz)})

    def cancel_event(arguments: dict[str, Any]) -> str:
        event = calendar.find(required(arguments, "event"), optional_day(arguments))
        return as_json({"cancelled": calendar.cancel(event.uid).summary(ctx.tz)})

    def confirm_cancel(arguments: dict[str, Any]) -> str:
        try:
            event = calendar.find(required(arguments, "event"), optional_day(arguments))
        except ToolError:  # the run itself will say what is wrong
            return f"Cancel the event '{arguments.get('event')}'?"
        when = spoken_day(event.start.date()) + ("" if event.all_day else f" at {event.start:%H:%M}")
        return f"Cancel '{event.title}' on {when}?"

    def free_time(arguments: dict[str, Any]) -> str:
        day = parse_date(arguments.get("date") or "today", today())
        day_start = parse_time(arguments.get("from") or "08:00")
        day_end = parse_time(arguments.get("to") or "20:00")
        slots = calendar.free_slots(day, day_start, day_end)
        return as_json({"date": day.isoformat(), "free": [f"{begin:%H:%M}-{end:%H:%M}" for begin, end in slots]})

    event_words = {"type": "string", "description": "the event's id, or words of its title ('dentist')"}
    on_day = {"type": "string",
              "description": "the event's date (YYYY-MM-DD, 'today', 'tomorrow'), to tell apart events of the same name"}
    return [
        Tool("calendar_list_events", "List the events on the user's calendar on a day, or from date to end_date.",
             {"type": "object", "properties": {
                 "date": {"type": "string", "description": "YYYY-MM-DD, 'today' (default), 'tomorrow' or a weekday"},
                 "end_date": {"type": "string", "description": "last day of a range, inclusive"}}},
             list_events),
        Tool("calendar_add_event", "Put a new event on the user's calendar.",
             {"type": "object", "required": ["title", "start"], "properties": {
                 "title": {"type": "string"},
                 "start": {"type": "string", "description": "local date and time, YYYY-MM-DDTHH:MM, or 'tomorrow 15:00'; "
                                                            "a date alone (YYYY-MM-DD) makes an all-day event"},
                 "end": {"type": "string", "description": "local date and time (or last date of an all-day event); "
                                                          "default: start plus duration_minutes"},
                 "duration_minutes": {"type": "number", "description": "default 60"},
                 "location": {"type": "string"}}},
             add_event),
        Tool("calendar_move_event", "Move an event on the user's calendar to a new time (it keeps its length).",
             {"type": "object", "required": ["event", "new_start"], "properties": {
                 "event": event_words, "date": on_day,
                 "new_start": {"type": "string", "description": "YYYY-MM-DDTHH:MM; a date alone keeps the time of day"},
                 "new_end": {"type": "string", "description": "optional new end"}}},
             move_event),
        Tool("calendar_cancel_event", "Delete an event from the user's calendar.",
             {"type": "object", "required": ["event"], "properties": {"event": event_words, "date": on_day}},
             cancel_event, confirm=confirm_cancel),
        Tool("calendar_free_time", "The user's free time slots on a day, between 'from' and 'to' (08:00-20:00 by default).",
             {"type": "object", "properties": {
                 "date": {"type": "string", "description": "YYYY-MM-DD, 'today' (default) or 'tomorrow'"},
                 "from": {"type": "string", "description": "HH:MM"}, "to": {"type": "string", "description": "HH:MM"}}},
             free_time),
    ]
