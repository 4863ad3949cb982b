"""Persistence of the desired state in SQLite (``memory://`` or a database file)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from paddler.errors import ConfigurationError

MEMORY_URL = "memory://"


def database_path(url: str) -> str:
    """The SQLite path for ``--state-database``: ``memory://``, ``sqlite:///path``,
    ``file:///path`` or a plain file path."""
    if url in (MEMORY_URL, ":memory:"):
        return ":memory:"
    for prefix in ("sqlite://", "file://"):
        if url.startswith(prefix):
            url = url[len(prefix) :]
            break
    if not url:
        raise ConfigurationError("state_database", "is empty; use memory:// or a file path")
    path = Path(url).expanduser()
    if path.is_dir():
        raise ConfigurationError("state_database", f"{path} is a directory, not a database file")
    if not path.parent.exists():
        raise ConfigurationError("state_database", f"directory {path.parent} does not exist")
    return str(path)


class StateStore:
    """One row holding the desired state as JSON; closed explicitly."""

    def __init__(self, url: str = MEMORY_URL) -> None:
        self.url = url
        try:
            self._db = sqlite3.connect(database_path(url), isolation_level=None)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS desired_state ("
                " id INTEGER PRIMARY KEY CHECK (id = 1),"
                " body TEXT NOT NULL,"
                " updated_at REAL NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise ConfigurationError("state_database", f"cannot open {url}: {exc}") from exc

    def load(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT body FROM desired_state WHERE id = 1").fetchone()
        if row is None:
            return None
        value = json.loads(row[0])
        return value if isinstance(value, dict) else None

    def save(self, state: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT INTO desired_state (id, body, updated_at) VALUES (1, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
            (json.dumps(state, sort_keys=True), time.time()),
        )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<StateStore {self.url}>"
