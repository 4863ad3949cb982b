"""Persistence in SQLite (``memory://`` or a database file): the desired state, and
the responses of the OpenAI Responses API kept for ``previous_response_id``."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from paddler.errors import ConfigurationError
from paddler.protocol.codec import MAX_BODY_BYTES

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


MAX_STORED_RESPONSE_BYTES = MAX_BODY_BYTES - 65536
"""The largest stored response: it travels in one message, with room for its id."""
MAX_RESPONSE_ID = 128
"""The longest id a stored response may have."""
EVICTION_BATCH = 64
"""Oldest responses looked at per query while evicting."""


class ResponseTooLarge(Exception):
    """A response larger than a stored response may be."""


class StoredChanged(Exception):
    """A conditional put found another body than the one it was to replace."""


class ResponseStore:
    """Responses of the OpenAI Responses API kept for ``previous_response_id`` and
    ``GET /v1/responses/{id}``: opaque bodies by id, in the state database (a
    connection of its own). Bounded: a body of at most ``max_bytes``; at most
    ``max_count`` bodies of ``max_total_bytes`` together, the oldest evicted first to
    make room. The broker's loop calls it, so every call is one short statement:
    a database file is in WAL mode with ``synchronous=NORMAL`` (a commit writes the
    log without waiting for the disk; the last commits may be lost on a power cut,
    not on a crash of the process), ``memory://`` never touches a disk."""

    def __init__(
        self,
        url: str = MEMORY_URL,
        *,
        max_count: int = 1000,
        max_bytes: int = 1 << 20,
        max_total_bytes: int = 64 << 20,
    ) -> None:
        if max_bytes > MAX_STORED_RESPONSE_BYTES:
            raise ConfigurationError(
                "--max-stored-response-bytes",
                f"must be at most {MAX_STORED_RESPONSE_BYTES} (a message's body), got {max_bytes}",
            )
        self.url = url
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        path = database_path(url)
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
            if path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS stored_responses ("
                " seq INTEGER PRIMARY KEY,"
                " id TEXT NOT NULL UNIQUE,"
                " body BLOB NOT NULL,"
                " stored_at REAL NOT NULL)"
            )
            count, total = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM stored_responses"
            ).fetchone()
        except sqlite3.Error as exc:
            raise ConfigurationError("state_database", f"cannot open {url}: {exc}") from exc
        self.count: int = count
        self.total_bytes: int = total
        self._evict(0)  # the bounds may be lower than when the file was written

    @property
    def enabled(self) -> bool:
        return self.max_count > 0

    def put(self, response_id: str, body: bytes, expected: bytes | None = None) -> int:
        """Keep ``body`` as ``response_id`` (replacing one of that id); how many older
        responses were evicted to make room. ``ResponseTooLarge`` past ``max_bytes``
        or ``max_total_bytes`` (nothing is evicted then). With ``expected``, only if
        the body kept as ``response_id`` is that one: ``KeyError`` when there is none,
        ``StoredChanged`` when it is another (a read-modify-write that lost a race)."""
        if expected is not None:
            current = self.get(response_id)
            if current is None:
                raise KeyError(response_id)
            if current != expected:
                raise StoredChanged(f"{response_id!r} changed since it was read")
        size = len(body)
        limit = min(self.max_bytes, self.max_total_bytes)
        if not self.enabled:
            raise ResponseTooLarge("this balancer keeps no responses (--max-stored-responses 0)")
        if size > limit:
            raise ResponseTooLarge(
                f"a stored response may hold at most {limit} bytes, this one has {size}"
            )
        self.delete(response_id)
        evicted = self._evict(size)
        self._db.execute(
            "INSERT INTO stored_responses (id, body, stored_at) VALUES (?, ?, ?)",
            (response_id, body, time.time()),
        )
        self.count += 1
        self.total_bytes += size
        return evicted

    def get(self, response_id: str) -> bytes | None:
        row = self._db.execute(
            "SELECT body FROM stored_responses WHERE id = ?", (response_id,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def delete(self, response_id: str) -> bool:
        """Forget ``response_id``; whether it was kept."""
        row = self._db.execute(
            "DELETE FROM stored_responses WHERE id = ? RETURNING LENGTH(body)", (response_id,)
        ).fetchone()
        if row is None:
            return False
        self.count -= 1
        self.total_bytes -= row[0]
        return True

    def _evict(self, room: int) -> int:
        """Forget the oldest responses until one more of ``room`` bytes fits (``room``
        0: until the bounds hold); how many were forgotten."""
        extra = 1 if room else 0
        evicted = 0
        while self.count and (
            self.count + extra > self.max_count or self.total_bytes + room > self.max_total_bytes
        ):
            oldest = self._db.execute(
                "SELECT seq, LENGTH(body) FROM stored_responses ORDER BY seq LIMIT ?",
                (EVICTION_BATCH,),
            ).fetchall()
            last = None
            for seq, size in oldest:
                if not (
                    self.count + extra > self.max_count
                    or self.total_bytes + room > self.max_total_bytes
                ):
                    break
                self.count -= 1
                self.total_bytes -= size
                evicted += 1
                last = seq
            if last is None:
                break
            self._db.execute("DELETE FROM stored_responses WHERE seq <= ?", (last,))
        return evicted

    def close(self) -> None:
        self._db.close()

    def __repr__(self) -> str:
        return f"<ResponseStore {self.url} count={self.count} bytes={self.total_bytes}>"
