"""What an engine reports about itself, and the model downloads that feed it.

The status is written by the engine thread and by a download's own thread (its
progress), read by the worker: one lock guards it. ``Downloads`` keeps the one
download of the applied state (``current``) and the ones a newer state cancelled,
until their threads are seen to end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from paddler.agent.llama.loading import ModelFetch, ModelResolver
from paddler.protocol.messages import AgentStatus

log = logging.getLogger("paddler.agent")

PROGRESS_EVERY_S = 0.2
"""Download progress is reported at most this often (and once at the end)."""


class StatusBoard:
    def __init__(self, slots_total: int) -> None:
        self.slots_total = slots_total
        self.lock = threading.Lock()
        self._status = self._fresh()
        self._changed = False
        self._last_progress = 0.0

    def _fresh(self) -> AgentStatus:
        return AgentStatus(slots_total=self.slots_total, desired_slots_total=self.slots_total)

    def snapshot(self) -> AgentStatus:
        with self.lock:
            return AgentStatus(**self._status.to_body())

    def set(self, **changes: Any) -> None:
        with self.lock:
            for name, value in changes.items():
                setattr(self._status, name, value)
            self._changed = True

    def reset(self) -> None:
        """Back to a fresh status (after an engine fault)."""
        with self.lock:
            self._status = self._fresh()
            self._changed = True

    def take_change(self) -> bool:
        with self.lock:
            changed, self._changed = self._changed, False
        return changed

    def _due(self, current: int, total: int | None) -> bool:
        now = time.monotonic()
        if now - self._last_progress > PROGRESS_EVERY_S or bool(total and current >= total):
            self._last_progress = now
            return True
        return False

    def progress_while(
        self, is_current: Callable[[], bool]
    ) -> Callable[[int, int | None, str], None]:
        """A progress callback for a download's thread: it writes the status only while
        ``is_current()`` (checked under the lock)."""

        def progress(current: int, total: int | None, filename: str) -> None:
            with self.lock:
                if not is_current():
                    return
                self._write_progress(current, total, filename)
                if self._due(current, total):
                    self._changed = True

        return progress

    def progress_now(
        self, current: int, total: int | None, filename: str, listener: Callable[[], None] | None
    ) -> None:
        """Progress of a resolution on the engine thread, reported through ``listener``."""
        with self.lock:
            self._write_progress(current, total, filename)
        if listener is not None and self._due(current, total):
            listener()

    def _write_progress(self, current: int, total: int | None, filename: str) -> None:
        self._status.download_current = current
        self._status.download_total = total or 0
        self._status.download_filename = filename


class Downloads:
    """The download of the applied state's model (``current``) and cancelled ones."""

    def __init__(self, board: StatusBoard, resolver: ModelResolver, cancellable: bool) -> None:
        self.board = board
        self.resolver = resolver
        self.cancellable = cancellable
        self.current: ModelFetch | None = None
        self.cancelled: list[ModelFetch] = []

    def start(self, state: dict[str, Any]) -> None:
        self.reap()
        fetch = ModelFetch(state, self.resolver, cancellable=self.cancellable, after=self.cancelled)
        with self.board.lock:
            self.current = fetch
        fetch.start(
            self.board.progress_while(
                lambda: fetch is self.current and not fetch.cancelled.is_set()
            )
        )

    def take_finished(self) -> ModelFetch | None:
        """The current download if it has finished (then no longer current)."""
        fetch = self.current
        if fetch is None or not fetch.finished:
            return None
        with self.board.lock:
            self.current = None
        return fetch

    def cancel(self) -> None:
        """Cancel the download in progress, if any, without waiting for it to stop."""
        fetch = self.current
        if fetch is None:
            return
        with self.board.lock:
            self.current = None
        fetch.cancel()
        self.cancelled.append(fetch)
        log.info("cancelled the download of %r: a newer desired state", fetch.state["model"])

    def reap(self) -> None:
        """Forget cancelled downloads whose threads have ended."""
        self.cancelled = [f for f in self.cancelled if not f.join(0)]

    def stop_all(self, wait_s: float) -> None:
        self.cancel()
        for fetch in self.cancelled:
            if not fetch.join(wait_s):
                log.warning("a model download did not stop within %.0f s", wait_s)
        self.cancelled.clear()
