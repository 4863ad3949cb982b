"""Download progress, throttled for whoever listens (the agent's status reports)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

ProgressCallback = Callable[[int, int | None, str], None]
"""``progress(current_bytes, total_bytes_or_None, filename)``."""


class ProgressReporter:
    """Forwards progress to the callback, at most every ``interval_s`` (unless forced)."""

    def __init__(
        self, callback: ProgressCallback | None, filename: str, *, interval_s: float
    ) -> None:
        self.filename = filename
        self.interval_s = interval_s
        self._callback = callback
        self._last: float | None = None
        self._lock = threading.Lock()

    def report(self, current: int, total: int | None, *, force: bool = False) -> None:
        """Call the callback unless one was made less than ``interval_s`` ago."""
        if self._callback is None:
            return
        with self._lock:
            now = time.monotonic()
            if not force and self._last is not None and now - self._last < self.interval_s:
                return
            self._last = now
        self._callback(current, total, self.filename)
