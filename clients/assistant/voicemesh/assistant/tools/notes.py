"""The user's notes: a folder of Markdown and text files (<data_dir>/notes/ by default, or
settings["notes_dir"]), searched through an SQLite FTS5 index (<data_dir>/notes.sqlite3).

The folder is the truth and the index only a cache: before each search the index catches up
with the files whose size or mtime changed, and forgets the ones gone.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voicemesh.assistant.toolkit import Context, Tool, ToolError
from voicemesh.assistant.tools.store import connect
from voicemesh.assistant.tools.when import as_json, required

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,  -- path relative to the notes folder, with '/'
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS notes USING fts5(title, body, tokenize = 'porter unicode61');
"""
SUFFIXES = (".md", ".markdown", ".txt")
READ_LIMIT = 4000  # characters of a note handed to the model at once


@dataclass(frozen=True)
class Match:
    file: str
    title: str
    snippet: str


class Notes:
    def __init__(self, folder: Path, index_path: Path) -> None:
        self.folder, self.index_path = Path(folder), Path(index_path)

    def reindex(self) -> tuple[int, int]:
        """Bring the index up to date with the folder: (notes indexed anew, notes dropped)."""
        on_disk = {path.relative_to(self.folder).as_posix(): path.stat() for path in self._files()}
        indexed = removed = 0
        with self._db() as db:
            known = {row["name"]: row for row in db.execute("SELECT * FROM files")}
            for name, row in known.items():
                if name not in on_disk:
                    db.execute("DELETE FROM notes WHERE rowid = ?", (row["id"],))
                    db.execute("DELETE FROM files WHERE id = ?", (row["id"],))
                    removed += 1
            for name, stat in on_disk.items():
                row = known.get(name)
                if row is not None and (row["mtime_ns"], row["size"]) == (stat.st_mtime_ns, stat.st_size):
                    continue
                text = (self.folder / name).read_text(encoding="utf-8", errors="replace")
                if row is None:
                    file_id = db.execute("INSERT INTO files (name, mtime_ns, size) VALUES (?, ?, ?)",
                                         (name, stat.st_mtime_ns, stat.st_size)).lastrowid
                else:
                    file_id = row["id"]
                    db.execute("UPDATE files SET mtime_ns = ?, size = ? WHERE id = ?", (stat.st_mtime_ns, stat.st_size, file_id))
                    db.execute("DELETE FROM notes WHERE rowid = ?", (file_id,))
                db.execute("INSERT INTO notes (rowid, title, body) VALUES (?, ?, ?)", (file_id, _title(name, text), text))
                indexed += 1
        return indexed, removed

    def search(self, query: str, limit: int = 5) -> list[Match]:
        """The best matches, all words first; if no note has them all, any of them."""
        words = re.findall(r"\w+", query)
        if not words:
            raise ToolError("give some words to search the notes for")
        self.reindex()
        quoted = [f'"{word}"' for word in words]  # quoted: the user's words are never FTS5 syntax
        with self._db() as db:
            for expression in (" ".join(quoted), " OR ".join(quoted)):
                rows = db.execute(
                    "SELECT files.name, notes.title, snippet(notes, 1, '', '', '…', 24) AS snippet"
                    " FROM notes JOIN files ON files.id = notes.rowid"
                    " WHERE notes MATCH ? ORDER BY bm25(notes, 5.0, 1.0) LIMIT ?", (expression, limit)).fetchall()
                if rows:
                    return [Match(row["name"], row["title"], " ".join(row["snippet"].split())) for row in rows]
        return []

    def add(self, title: str, text: str) -> str:
        """Write a new note as Markdown, named after its title; returns the file name."""
        title = " ".join(title.split())
        if not title:
            raise ToolError("a note needs a title")
        slug = re.sub(r"[^\w]+", "-", title.lower()).strip("-")[:60] or "note"
        self.folder.mkdir(parents=True, exist_ok=True)
        name, number = f"{slug}.md", 2
        while (self.folder / name).exists():
            name, number = f"{slug}-{number}.md", number + 1
        temporary = self.folder / f".{name}.tmp"  # hidden, so a search meanwhile skips it
        temporary.write_text(f"# {title}\n\n{text.strip()}\n", encoding="utf-8")
        os.replace(temporary, self.folder / name)
        self.reindex()
        return name

    def read(self, name: str) -> str:
        path = (self.folder / name).resolve()
        if not path.is_relative_to(self.folder.resolve()) or path.suffix.lower() not in SUFFIXES or not path.is_file():
            raise ToolError(f"there is no note '{name}'")
        text = path.read_text(encoding="utf-8", errors="replace")
        return text if len(text) <= READ_LIMIT else text[:READ_LIMIT] + "\n[… the note goes on]"

    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [path for path in sorted(self.folder.rglob("*"))
                if path.suffix.lower() in SUFFIXES and path.is_file()
                and not any(part.startswith(".") for part in path.relative_to(self.folder).parts)]

    def _db(self):
        return connect(self.index_path, SCHEMA, SCHEMA_VERSION)


def _title(name: str, text: str) -> str:
    """The first Markdown heading, else the file's name."""
    for line in text.splitlines()[:20]:
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return Path(name).stem.replace("-", " ").replace("_", " ")


# -- the tools ----------------------------------------------------------------------------------

def tools(ctx: Context) -> list[Tool]:
    folder = Path(ctx.settings.get("notes_dir") or ctx.data_dir / "notes").expanduser()
    notes = Notes(folder, ctx.data_dir / "notes.sqlite3")

    def search(arguments: dict[str, Any]) -> str:
        limit = arguments.get("limit") or 5
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 20:
            raise ToolError("limit must be a whole number from 1 to 20")
        found = notes.search(required(arguments, "query"), limit)
        if not found:
            return as_json({"matches": [], "note": f"no note mentions '{arguments['query']}'"})
        return as_json({"matches": [{"file": match.file, "title": match.title, "snippet": match.snippet} for match in found]})

    def add(arguments: dict[str, Any]) -> str:
        return as_json({"saved": notes.add(required(arguments, "title"), required(arguments, "text"))})

    def read(arguments: dict[str, Any]) -> str:
        return notes.read(required(arguments, "file"))

    return [
        Tool("notes_search",
             "Search the user's own notes (their notes folder only: this is not a web search) for words; "
             "returns each matching note's file name and a snippet, to cite.",
             {"type": "object", "required": ["query"], "properties": {
                 "query": {"type": "string", "description": "words to look for"},
                 "limit": {"type": "integer", "description": "at most this many notes, default 5"}}},
             search),
        Tool("notes_read", "Read one of the user's notes in full, by the file name a search returned.",
             {"type": "object", "required": ["file"], "properties": {"file": {"type": "string"}}},
             read),
        Tool("notes_add", "Save a new note in the user's notes folder.",
             {"type": "object", "required": ["title", "text"], "properties": {
                 "title": {"type": "string"}, "text": {"type": "string", "description": "the note, Markdown allowed"}}},
             add),
    ]
