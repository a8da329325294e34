"""The SQLite files behind the tools: opened per operation, the schema created on first use.

One connection per operation: tools may run on any thread, and the file stays consistent for
anything else that opens it. PRAGMA user_version records the schema's version, so a later
release can migrate, and an older one refuses a file it does not understand.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from voicemesh.assistant.toolkit import ToolError


@contextmanager
def connect(path: Path, schema: str, version: int) -> Iterator[sqlite3.Connection]:
    """One transaction on `path`: committed when the block ends, rolled back if it raises.
    `schema` must be idempotent (IF NOT EXISTS): two processes may create it at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found == 0:
            db.executescript(f"BEGIN; {schema} PRAGMA user_version = {version}; COMMIT;")
        elif found > version:
            raise ToolError(f"{path.name} was written by a newer version of the assistant (schema {found})")
        with db:
            yield db
    finally:
        db.close()
