"""The calendar tools on a real .ics file: time zones as stored and as read back, events other
programs wrote (all-day, floating, UTC, recurring), moves, cancels, free time and bad input."""
from __future__ import annotations

import json
from datetime import date, datetime, time

import icalendar
import pytest

from assistant.backends import PARIS, UTC, make_ctx, tool
from voicemesh.assistant.toolkit import ToolError, call
from voicemesh.assistant.tools import calendar
from voicemesh.assistant.tools.calendar import Calendar

FOREIGN = b"""BEGIN:VCALENDAR\r
VERSION:2.0\r
PRODID:-//Other//App//EN\r
BEGIN:VEVENT\r
UID:holiday@other\r
SUMMARY:Public holiday\r
DTSTART;VALUE=DATE:20261202\r
DTEND;VALUE=DATE:20261203\r
END:VEVENT\r
BEGIN:VEVENT\r
UID:standup@other\r
SUMMARY:Standup\r
DTSTART:20261202T083000Z\r
DTEND:20261202T084500Z\r
END:VEVENT\r
BEGIN:VEVENT\r
UID:gym@other\r
SUMMARY:Gym\r
DTSTART:20261202T180000\r
DURATION:PT1H30M\r
END:VEVENT\r
BEGIN:VEVENT\r
UID:undated@other\r
SUMMARY:Someday, no start\r
END:VEVENT\r
BEGIN:VEVENT\r
UID:call@other\r
SUMMARY:Call with Ann\r
DTSTART;TZID=America/New_York:20261202T060000\r
END:VEVENT\r
END:VCALENDAR\r
"""


def run(tools, name, **arguments):
    return json.loads(_sync(tool(tools, name), arguments))


def _sync(item, arguments):
    result = item.run(arguments)
    assert isinstance(result, str), "calendar tools are synchronous"
    return result


def test_an_event_is_stored_with_its_tzid_and_read_back_in_any_zone(tmp_path):
    ctx = make_ctx(tmp_path)
    shown = run(calendar.tools(ctx), "calendar_add_event", title="Dentist", start="2026-12-02T15:00", duration_minutes=45)
    assert shown["scheduled"]["id"].endswith("@voicemesh")
    expected = {"id": "", "title": "Dentist", "start": "2026-12-02 15:00", "end": "2026-12-02 15:45"}
    assert shown["scheduled"] | {"id": ""} == expected

    text = (tmp_path / "calendar.ics").read_text()
    assert "DTSTART;TZID=Europe/Paris:20261202T150000" in text
    assert "BEGIN:VTIMEZONE" in text and "TZID:Europe/Paris" in text  # other programs need the zone's rules
    [event] = Calendar(tmp_path / "calendar.ics", UTC).on(date(2026, 12, 2))
    assert event.start == datetime(2026, 12, 2, 14, 0, tzinfo=UTC)
    assert [path.name for path in tmp_path.iterdir()] == ["calendar.ics"]  # the temporary file was renamed away


def test_a_utc_user_gets_events_stored_in_utc(tmp_path):
    ctx = make_ctx(tmp_path, tz=UTC)
    run(calendar.tools(ctx), "calendar_add_event", title="Dentist", start="2026-12-02T15:00")
    assert "DTSTART:20261202T150000Z" in (tmp_path / "calendar.ics").read_text()


def test_an_offset_in_the_argument_is_honoured(tmp_path):
    ctx = make_ctx(tmp_path)
    shown = run(calendar.tools(ctx), "calendar_add_event", title="Call", start="2026-12-02T09:00-05:00")
    assert shown["scheduled"]["start"] == "2026-12-02 15:00"


def test_events_other_programs_wrote_are_read_in_the_users_zone(tmp_path):
    (tmp_path / "calendar.ics").write_bytes(FOREIGN)
    ctx = make_ctx(tmp_path)  # today is 2026-12-01
    events = run(calendar.tools(ctx), "calendar_list_events", date="tomorrow")["events"]
    assert events == [
        {"id": "holiday@other", "title": "Public holiday", "date": "2026-12-02", "all_day": True},
        {"id": "standup@other", "title": "Standup", "start": "2026-12-02 09:30", "end": "2026-12-02 09:45"},
        {"id": "call@other", "title": "Call with Ann", "start": "2026-12-02 12:00", "end": "2026-12-02 12:00"},
        {"id": "gym@other", "title": "Gym", "start": "2026-12-02 18:00", "end": "2026-12-02 19:30"},  # floating: local
    ]
    assert run(calendar.tools(ctx), "calendar_list_events", date="2026-12-03")["events"] == []
    ranged = run(calendar.tools(ctx), "calendar_list_events", date="2026-12-01", end_date="2026-12-07")
    assert len(ranged["events"]) == 4


def test_a_new_york_user_sees_the_same_file_in_new_york_time(tmp_path):
    from zoneinfo import ZoneInfo

    (tmp_path / "calendar.ics").write_bytes(FOREIGN)
    new_york = ZoneInfo("America/New_York")
    by_title = {event.title: event for event in Calendar(tmp_path / "calendar.ics", new_york).on(date(2026, 12, 2))}
    assert by_title["Standup"].start.time() == time(3, 30)
    assert by_title["Call with Ann"].start.time() == time(6, 0)
    assert by_title["Gym"].start.time() == time(18, 0)  # floating times are wall times wherever the user is


def test_free_time_skips_all_day_events_and_merges_overlaps(tmp_path):
    (tmp_path / "calendar.ics").write_bytes(FOREIGN)
    ctx = make_ctx(tmp_path)
    tools = calendar.tools(ctx)
    run(tools, "calendar_add_event", title="Lunch", start="2026-12-02T12:00", end="2026-12-02T13:30")
    run(tools, "calendar_add_event", title="Review", start="2026-12-02T13:00", end="2026-12-02T14:00")
    free = run(tools, "calendar_free_time", date="2026-12-02")
    assert free == {"date": "2026-12-02", "free": ["08:00-09:30", "09:45-12:00", "14:00-18:00", "19:30-20:00"]}
    assert run(tools, "calendar_free_time", date="2026-12-02", **{"from": "19:00", "to": "22:00"})["free"] == ["19:30-22:00"]
    assert run(tools, "calendar_free_time", date="2026-12-05")["free"] == ["08:00-20:00"]


def test_move_keeps_the_length_and_cancel_asks_first(tmp_path):
    ctx = make_ctx(tmp_path)
    tools = calendar.tools(ctx)
    run(tools, "calendar_add_event", title="Dentist", start="tomorrow 15:00", duration_minutes=30)
    moved = run(tools, "calendar_move_event", event="dentist", date="tomorrow", new_start="2026-12-03T09:00")["moved"]
    assert (moved["start"], moved["end"]) == ("2026-12-03 09:00", "2026-12-03 09:30")
    stored = icalendar.Calendar.from_ical((tmp_path / "calendar.ics").read_bytes())
    [item] = stored.walk("VEVENT")
    assert int(item["sequence"]) == 1  # other calendars see it as an update
    moved = run(tools, "calendar_move_event", event=moved["id"], new_start="friday")["moved"]  # same time, another day
    assert (moved["start"], moved["end"]) == ("2026-12-04 09:00", "2026-12-04 09:30")
    moved = run(tools, "calendar_move_event", event="dentist", new_start="2026-12-03T09:00")["moved"]

    cancel = tool(tools, "calendar_cancel_event")
    assert cancel.confirm is not None
    assert cancel.confirm({"event": "dentist"}) == "Cancel 'Dentist' on Thursday 3 December at 09:00?"
    assert run(tools, "calendar_cancel_event", event="Dentist")["cancelled"]["title"] == "Dentist"
    assert run(tools, "calendar_list_events", date="2026-12-03")["events"] == []


def test_a_date_alone_makes_an_all_day_event(tmp_path):
    ctx = make_ctx(tmp_path)
    tools = calendar.tools(ctx)
    shown = run(tools, "calendar_add_event", title="Mum's birthday", start="2026-12-05")["scheduled"]
    assert shown | {"id": ""} == {"id": "", "title": "Mum's birthday", "date": "2026-12-05", "all_day": True}
    trip = run(tools, "calendar_add_event", title="Ski trip", start="2026-12-19", end="2026-12-23")["scheduled"]
    assert (trip["date"], trip["last_date"]) == ("2026-12-19", "2026-12-23")
    text = (tmp_path / "calendar.ics").read_text()
    assert "DTSTART;VALUE=DATE:20261205" in text and "DTEND;VALUE=DATE:20261224" in text  # DTEND is exclusive
    assert [event["title"] for event in run(tools, "calendar_list_events", date="2026-12-23")["events"]] == ["Ski trip"]
    assert run(tools, "calendar_list_events", date="2026-12-24")["events"] == []


def test_a_point_in_time_at_midnight_is_on_its_day_and_takes_no_time(tmp_path):
    ctx = make_ctx(tmp_path)
    tools = calendar.tools(ctx)
    run(tools, "calendar_add_event", title="Flight check-in opens", start="2026-12-02T00:00", duration_minutes=1)
    calendar_file = tmp_path / "calendar.ics"
    stored = icalendar.Calendar.from_ical(calendar_file.read_bytes())
    [item] = stored.walk("VEVENT")
    del item["dtend"]  # as other programs may write it: no DTEND, no DURATION
    calendar_file.write_bytes(stored.to_ical())
    [event] = run(tools, "calendar_list_events", date="2026-12-02")["events"]
    assert (event["start"], event["end"]) == ("2026-12-02 00:00", "2026-12-02 00:00")
    assert run(tools, "calendar_list_events", date="2026-12-01")["events"] == []
    assert run(tools, "calendar_free_time", date="2026-12-02", **{"from": "00:00"})["free"] == ["00:00-20:00"]


def test_an_all_day_event_moves_as_a_day(tmp_path):
    (tmp_path / "calendar.ics").write_bytes(FOREIGN)
    ctx = make_ctx(tmp_path)
    moved = run(calendar.tools(ctx), "calendar_move_event", event="holiday", new_start="2026-12-08")["moved"]
    assert moved == {"id": "holiday@other", "title": "Public holiday", "date": "2026-12-08", "all_day": True}


async def test_unknown_or_ambiguous_events_and_bad_times_are_explained(tmp_path):
    ctx = make_ctx(tmp_path)
    tools = calendar.tools(ctx)
    with pytest.raises(ToolError, match="no event matches 'dentist' on Wednesday 2 December"):
        await call(tool(tools, "calendar_cancel_event"), {"event": "dentist", "date": "tomorrow"})
    run(tools, "calendar_add_event", title="Team call", start="2026-12-02T10:00")
    run(tools, "calendar_add_event", title="Call mum", start="2026-12-02T18:00")
    with pytest.raises(ToolError, match="2 events match 'call'.*Team call at 2026-12-02 10:00"):
        await call(tool(tools, "calendar_move_event"), {"event": "call", "new_start": "2026-12-02T11:00"})
    with pytest.raises(ToolError, match="'next blursday' is not a date"):
        await call(tool(tools, "calendar_list_events"), {"date": "next blursday"})
    with pytest.raises(ToolError, match="'half past three' is not a date and time"):
        await call(tool(tools, "calendar_add_event"), {"title": "x", "start": "half past three"})
    with pytest.raises(ToolError, match="must end after it starts"):
        await call(tool(tools, "calendar_add_event"), {"title": "x", "start": "2026-12-02T10:00", "end": "2026-12-02T09:00"})
    with pytest.raises(ToolError, match="missing argument 'title'"):
        await call(tool(tools, "calendar_add_event"), {"start": "2026-12-02T10:00"})
    with pytest.raises(ToolError, match="'25:00' is not a time"):
        await call(tool(tools, "calendar_free_time"), {"to": "25:00"})
    # the confirm question never fails: the run says what is wrong
    assert tool(tools, "calendar_cancel_event").confirm({"event": "nothing"}) == "Cancel the event 'nothing'?"


def test_a_damaged_file_is_reported_not_overwritten(tmp_path):
    (tmp_path / "calendar.ics").write_text("this is not iCalendar")
    ctx = make_ctx(tmp_path)
    with pytest.raises(ToolError, match="calendar.ics cannot be read"):
        tool(calendar.tools(ctx), "calendar_add_event").run({"title": "x", "start": "2026-12-02T10:00"})
    assert (tmp_path / "calendar.ics").read_text() == "this is not iCalendar"


def test_an_event_on_the_day_clocks_change_keeps_its_wall_time(tmp_path):
    ctx = make_ctx(tmp_path, now=datetime(2026, 3, 27, 9, 0, tzinfo=PARIS))
    tools = calendar.tools(ctx)
    run(tools, "calendar_add_event", title="Brunch", start="sunday 11:00")  # 2026-03-29, summer time starts at 02:00
    [event] = Calendar(tmp_path / "calendar.ics", UTC).on(date(2026, 3, 29))
    assert event.start == datetime(2026, 3, 29, 9, 0, tzinfo=UTC)  # CEST is UTC+2
    assert run(tools, "calendar_free_time", date="2026-03-29")["free"] == ["08:00-11:00", "12:00-20:00"]


# A weekly meeting another program wrote, in New York time: Tuesdays at 09:00 from 20 October,
# 8 December cancelled (EXDATE), 15 December moved to Wednesday 16th at 11:00 (an override),
# and a yearly all-day birthday. Paris and New York change clocks a week apart (25 Oct, 1 Nov).
WEEKLY = b"""BEGIN:VCALENDAR\r
VERSION:2.0\r
PRODID:-//Other//App//EN\r
BEGIN:VEVENT\r
UID:team@other\r
SUMMARY:Team meeting\r
DTSTART;TZID=America/New_York:20261020T090000\r
DTEND;TZID=America/New_York:20261020T100000\r
RRULE:FREQ=WEEKLY;BYDAY=TU\r
EXDATE;TZID=America/New_York:20261208T090000\r
END:VEVENT\r
BEGIN:VEVENT\r
UID:team@other\r
RECURRENCE-ID;TZID=America/New_York:20261215T090000\r
SUMMARY:Team meeting\r
DTSTART;TZID=America/New_York:20261216T110000\r
DTEND;TZID=America/New_York:20261216T120000\r
LOCATION:Room 4\r
END:VEVENT\r
BEGIN:VEVENT\r
UID:birthday@other\r
SUMMARY:Ann's birthday\r
DTSTART;VALUE=DATE:19901204\r
RRULE:FREQ=YEARLY\r
END:VEVENT\r
BEGIN:VEVENT\r
UID:undated@other\r
SUMMARY:Someday, no start\r
END:VEVENT\r
END:VCALENDAR\r
"""


def _starts(events):
    return [event.get("start") or event["date"] for event in events]


def test_a_weekly_event_shows_on_each_of_its_days_in_paris(tmp_path):
    (tmp_path / "calendar.ics").write_bytes(WEEKLY)
    tools = calendar.tools(make_ctx(tmp_path))  # today is Tuesday 2026-12-01
    assert run(tools, "calendar_list_events")["events"] == [
        {"id": "team@other", "title": "Team meeting", "start": "2026-12-01 15:00", "end": "2026-12-01 16:00", "repeats": True}]
    october = run(tools, "calendar_list_events", date="2026-10-19", end_date="2026-11-04")["events"]
    assert _starts(october) == ["2026-10-20 15:00", "2026-10-27 14:00", "2026-11-03 15:00"]  # the week between the changes
    december = run(tools, "calendar_list_events", date="2026-12-01", end_date="2026-12-31")["events"]
    assert _starts(december) == ["2026-12-01 15:00", "2026-12-04", "2026-12-16 17:00", "2026-12-22 15:00", "2026-12-29 15:00"]
    assert december[1] == {"id": "birthday@other", "title": "Ann's birthday", "date": "2026-12-04", "all_day": True,
                           "repeats": True}
    assert december[2]["location"] == "Room 4"  # the override's own properties
    assert run(tools, "calendar_list_events", date="2026-12-08")["events"] == []  # EXDATE
    assert run(tools, "calendar_list_events", date="2026-12-15")["events"] == []  # moved away from its day
    assert _starts(run(tools, "calendar_list_events", date="2027-12-04")["events"]) == ["2027-12-04"]


def test_a_weekly_event_keeps_its_wall_time_for_a_new_york_user(tmp_path):
    from zoneinfo import ZoneInfo

    (tmp_path / "calendar.ics").write_bytes(WEEKLY)
    new_york = ZoneInfo("America/New_York")
    mine = Calendar(tmp_path / "calendar.ics", new_york)
    for day in (date(2026, 10, 20), date(2026, 10, 27), date(2026, 11, 3), date(2026, 12, 1), date(2026, 12, 22)):
        [event] = mine.on(day)
        assert (event.start.time(), event.end.time(), event.recurring) == (time(9), time(10), True), day
    assert mine.on(date(2026, 12, 8)) == [] and mine.on(date(2026, 12, 15)) == []
    [moved] = mine.on(date(2026, 12, 16))
    assert moved.start == datetime(2026, 12, 16, 11, 0, tzinfo=new_york)
    assert [event.title for event in mine.on(date(2026, 12, 4))] == ["Ann's birthday"]  # all-day: the date, in any zone


def test_free_time_counts_each_occurrence(tmp_path):
    (tmp_path / "calendar.ics").write_bytes(WEEKLY)
    tools = calendar.tools(make_ctx(tmp_path))
    assert run(tools, "calendar_free_time", date="2026-12-01")["free"] == ["08:00-15:00", "16:00-20:00"]
    assert run(tools, "calendar_free_time", date="2026-10-27")["free"] == ["08:00-14:00", "15:00-20:00"]
    assert run(tools, "calendar_free_time", date="2026-12-08")["free"] == ["08:00-20:00"]  # EXDATE
    assert run(tools, "calendar_free_time", date="2026-12-16")["free"] == ["08:00-17:00", "18:00-20:00"]  # the override
    assert run(tools, "calendar_free_time", date="2026-12-04")["free"] == ["08:00-20:00"]  # a birthday takes no time


async def test_a_recurring_event_is_not_changed_from_here(tmp_path):
    (tmp_path / "calendar.ics").write_bytes(WEEKLY)
    tools = calendar.tools(make_ctx(tmp_path))
    refused = "'Team meeting' is a recurring event.*cannot be moved or cancelled from here yet"
    with pytest.raises(ToolError, match=refused):
        await call(tool(tools, "calendar_cancel_event"), {"event": "team meeting", "date": "2026-12-22"})
    with pytest.raises(ToolError, match=refused):  # the override, by its day
        await call(tool(tools, "calendar_move_event"), {"event": "team", "date": "2026-12-16", "new_start": "2026-12-17"})
    with pytest.raises(ToolError, match=refused):  # the series by its id: one event, not two with the override
        await call(tool(tools, "calendar_cancel_event"), {"event": "team@other"})
    with pytest.raises(ToolError, match="'Ann's birthday' is a recurring event"):
        await call(tool(tools, "calendar_move_event"), {"event": "birthday", "new_start": "2026-12-05"})
    assert (tmp_path / "calendar.ics").read_bytes() == WEEKLY  # nothing was written
    # a new single event next to the series is still moved as before
    run(tools, "calendar_add_event", title="Dentist", start="2026-12-01T10:00")
    assert run(tools, "calendar_move_event", event="dentist", new_start="2026-12-02")["moved"]["start"] == "2026-12-02 10:00"
    assert _starts(run(tools, "calendar_list_events", date="2026-12-22")["events"]) == ["2026-12-22 15:00"]


def test_a_recurrence_rule_that_cannot_be_read_is_reported(tmp_path):
    broken = WEEKLY.replace(b"RRULE:FREQ=WEEKLY;BYDAY=TU", b"RRULE:FREQ=SOMETIMES")
    (tmp_path / "calendar.ics").write_bytes(broken)
    with pytest.raises(ToolError, match="a recurring event in calendar.ics cannot be read"):
        Calendar(tmp_path / "calendar.ics", PARIS).on(date(2026, 12, 1))
