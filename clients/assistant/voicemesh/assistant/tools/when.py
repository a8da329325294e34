"""Reading the dates and times the model passes to tools, in the user's time zone.

The model is asked for ISO text ("2026-12-02", "2026-12-02T15:00"); a few spoken words
("today", "tomorrow at 9:30", "friday") are accepted too, read relative to the context's clock.
Anything else is a ToolError the model can relay and correct.
"""
from __future__ import annotations

import json
import re
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from voicemesh.assistant.toolkit import ToolError

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_TIME = re.compile(r"^(\d{1,2})(?::(\d{2}))?\s*(am|pm)?$")


def parse_date(text: str, today: date) -> date:
    """An ISO date, or today / tomorrow / yesterday / a weekday name (its next occurrence, today included)."""
    word = str(text).strip().lower()
    if word == "today":
        return today
    if word == "tomorrow":
        return today + timedelta(days=1)
    if word == "yesterday":
        return today - timedelta(days=1)
    if word.removeprefix("next ") in WEEKDAYS:
        ahead = (WEEKDAYS.index(word.removeprefix("next ")) - today.weekday()) % 7
        return today + timedelta(days=ahead or (7 if word.startswith("next ") else 0))
    try:
        return date.fromisoformat(word)
    except ValueError:
        raise ToolError(f"'{text}' is not a date: use YYYY-MM-DD, 'today' or 'tomorrow'") from None


def parse_time(text: str) -> time:
    """'15:00', '9:30', '9', '9am', '3:15 pm'."""
    match = _TIME.match(str(text).strip().lower())
    if match:
        hour, minute, half = int(match[1]), int(match[2] or 0), match[3]
        if half:
            hour = hour % 12 + (12 if half == "pm" else 0)
        if hour < 24 and minute < 60:
            return time(hour, minute)
    raise ToolError(f"'{text}' is not a time of day: use HH:MM, for example 15:00")


def parse_datetime(text: str, tz: ZoneInfo, now: datetime, ahead: bool = False) -> datetime:
    """An aware datetime in `tz`: ISO ("2026-12-02T15:00", with or without an offset),
    "<date word> [at] <time>" ("tomorrow at 9:30", "today 15:00"), or a time alone: today,
    or with `ahead` its next occurrence (tomorrow once today's has passed)."""
    raw = str(text).strip()
    try:
        clock = parse_time(raw)
    except ToolError:
        pass
    else:
        moment = datetime.combine(now.astimezone(tz).date(), clock, tzinfo=tz)
        return moment + timedelta(days=1) if ahead and moment <= now else moment
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        moment = None
    if moment is not None:
        if moment.tzinfo is None:  # local wall time, as the user speaks it
            return moment.replace(tzinfo=tz)
        return moment.astimezone(tz)
    words = raw.lower().replace(" at ", " ").split(maxsplit=1)
    if len(words) == 2:
        try:
            day, clock = parse_date(words[0], now.date()), parse_time(words[1])
        except ToolError:
            pass
        else:
            return datetime.combine(day, clock, tzinfo=tz)
    raise ToolError(f"'{text}' is not a date and time: use YYYY-MM-DDTHH:MM, for example 2026-12-02T15:00")


def local_text(moment: datetime | date, tz: ZoneInfo) -> str:
    """How results show a time: local wall time, to the minute ("2026-12-02 15:00")."""
    if isinstance(moment, datetime):
        return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M")
    return moment.isoformat()


def spoken_day(day: date) -> str:
    return f"{day:%A} {day.day} {day:%B}"


def required(arguments: dict[str, Any], name: str) -> Any:
    """An argument the tool cannot do without, as a ToolError naming it when it is missing or empty."""
    value = arguments.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ToolError(f"missing argument '{name}'")
    return value.strip() if isinstance(value, str) else value


def as_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
