"""The user's to-do list: SQLite (<data_dir>/tasks.sqlite3)."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from voicemesh.assistant.toolkit import Context, Tool, ToolError
from voicemesh.assistant.tools.store import connect
from voicemesh.assistant.tools.when import as_json, parse_date, parse_datetime, required

SCHEMA_VERSION = 1
PRIORITIES = ("low", "normal", "high")  # stored as their index, so ORDER BY sorts them
SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 1,
    due TEXT,              -- ISO date, local to the user
    created_at TEXT NOT NULL,
    done_at TEXT           -- NULL while open
);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks (done_at, priority, due);
"""


@dataclass(frozen=True)
class Task:
    id: int
    title: str
    priority: str
    due: date | None
    done: bool

    def summary(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"id": self.id, "title": self.title, "priority": self.priority}
        if self.due:
            shown["due"] = self.due.isoformat()
        shown["done"] = self.done
        return shown


class Tasks:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def add(self, title: str, priority: str = "normal", due: date | None = None, now: datetime | None = None) -> Task:
        if not title.strip():
            raise ToolError("a task needs a title")
        with self._db() as db:
            cursor = db.execute("INSERT INTO tasks (title, priority, due, created_at) VALUES (?, ?, ?, ?)",
                                (title.strip(), _priority(priority), due and due.isoformat(), _stamp(now)))
            return self._get(db, cursor.lastrowid)

    def list(self, status: str = "open", due_by: date | None = None, priority: str | None = None) -> list[Task]:
        """Open tasks first by priority (high first), then by due date (undated last)."""
        where, values = [], []
        if status == "open":
            where.append("done_at IS NULL")
        elif status == "done":
            where.append("done_at IS NOT NULL")
        elif status != "all":
            raise ToolError(f"unknown status '{status}': use open, done or all")
        if due_by:
            where.append("due IS NOT NULL AND due <= ?")
            values.append(due_by.isoformat())
        if priority:
            where.append("priority = ?")
            values.append(_priority(priority))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._db() as db:
            rows = db.execute(f"SELECT * FROM tasks {clause} ORDER BY priority DESC, due IS NULL, due, id", values)
            return [_task(row) for row in rows]

    def get(self, task_id: int) -> Task:
        with self._db() as db:
            return self._get(db, task_id)

    def complete(self, task_id: int, now: datetime | None = None) -> Task:
        with self._db() as db:
            self._get(db, task_id)
            db.execute("UPDATE tasks SET done_at = coalesce(done_at, ?) WHERE id = ?", (_stamp(now), task_id))
            return self._get(db, task_id)

    def uncomplete(self, task_id: int) -> Task:
        with self._db() as db:
            self._get(db, task_id)
            db.execute("UPDATE tasks SET done_at = NULL WHERE id = ?", (task_id,))
            return self._get(db, task_id)

    def delete(self, task_id: int) -> Task:
        with self._db() as db:
            task = self._get(db, task_id)
            db.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            return task

    def _get(self, db: sqlite3.Connection, task_id: Any) -> Task:
        row = db.execute("SELECT * FROM tasks WHERE id = ?", (_task_id(task_id),)).fetchone()
        if row is None:
            raise ToolError(f"there is no task number {task_id}")
        return _task(row)

    def _db(self):
        return connect(self.path, SCHEMA, SCHEMA_VERSION)


def _priority(name: str) -> int:
    if name not in PRIORITIES:
        raise ToolError(f"unknown priority '{name}': use low, normal or high")
    return PRIORITIES.index(name)


def _task_id(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ToolError(f"'{value}' is not a task number") from None


def _stamp(now: datetime | None) -> str:
    return (now or datetime.now().astimezone()).isoformat(timespec="seconds")


def _task(row: sqlite3.Row) -> Task:
    return Task(row["id"], row["title"], PRIORITIES[row["priority"]], row["due"] and date.fromisoformat(row["due"]),
                row["done_at"] is not None)


# -- the tools ----------------------------------------------------------------------------------

def tools(ctx: Context) -> list[Tool]:
    tasks = Tasks(ctx.data_dir / "tasks.sqlite3")

    def today() -> date:
        return ctx.now().astimezone(ctx.tz).date()

    def due_date(text: str) -> date:
        """A date, or a date and time ("tomorrow 15:00", as models often write): tasks keep the day."""
        try:
            return parse_date(text, today())
        except ToolError as not_a_date:
            try:
                return parse_datetime(text, ctx.tz, ctx.now()).date()
            except ToolError:
                raise not_a_date from None

    def add(arguments: dict[str, Any]) -> str:
        due = due_date(arguments["due"]) if arguments.get("due") else None
        task = tasks.add(required(arguments, "title"), arguments.get("priority") or "normal", due, ctx.now())
        return as_json({"added": task.summary()})

    def list_tasks(arguments: dict[str, Any]) -> str:
        due = arguments.get("due")
        if not due:
            due_by = None
        elif due == "this_week":  # up to and including Sunday
            due_by = today() + timedelta(days=6 - today().weekday())
        else:
            due_by = parse_date(due, today())
        found = tasks.list(arguments.get("status") or "open", due_by, arguments.get("priority") or None)
        return as_json({"tasks": [task.summary() for task in found]})

    def complete(arguments: dict[str, Any]) -> str:
        return as_json({"completed": tasks.complete(required(arguments, "id"), ctx.now()).summary()})

    def uncomplete(arguments: dict[str, Any]) -> str:
        return as_json({"reopened": tasks.uncomplete(required(arguments, "id")).summary()})

    def delete(arguments: dict[str, Any]) -> str:
        return as_json({"deleted": tasks.delete(required(arguments, "id")).summary()})

    def confirm_delete(arguments: dict[str, Any]) -> str:
        try:
            return f"Delete the task '{tasks.get(required(arguments, 'id')).title}'?"
        except ToolError:
            return f"Delete task number {arguments.get('id')}?"

    task_id = {"type": "object", "required": ["id"],
               "properties": {"id": {"type": "integer", "description": "the task's number"}}}
    return [
        Tool("tasks_add", "Add a task to the user's to-do list.",
             {"type": "object", "required": ["title"], "properties": {
                 "title": {"type": "string"},
                 "priority": {"type": "string", "enum": list(PRIORITIES), "description": "default normal"},
                 "due": {"type": "string", "description": "due date: YYYY-MM-DD, 'today', 'tomorrow' or a weekday"}}},
             add),
        Tool("tasks_list",
             "List the user's tasks: open (default), done or all; optionally due by a date or this week, or of one priority.",
             {"type": "object", "properties": {
                 "status": {"type": "string", "enum": ["open", "done", "all"]},
                 "due": {"type": "string", "description": "'this_week', 'today', or a date: tasks due by then"},
                 "priority": {"type": "string", "enum": list(PRIORITIES)}}},
             list_tasks),
        Tool("tasks_complete", "Mark a task done.", task_id, complete),
        Tool("tasks_uncomplete", "Reopen a task marked done by mistake.", task_id, uncomplete),
        Tool("tasks_delete", "Delete a task from the list for good.", task_id, delete, confirm=confirm_delete),
    ]
