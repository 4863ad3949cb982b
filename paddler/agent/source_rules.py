"""What model sources the operator allows an agent: folders, hosts, sizes, stall time.

``ModelSourceRules`` is built once from the agent's settings (``from_settings``) and
applied to every model source the balancer names:

- ``LocalToAgent`` paths are resolved (``..`` and symlinks included) and must then lie
  in one of ``model_dirs``; with no ``model_dirs``, any path on the machine is taken
  (today's behaviour, and a warning at start);
- downloads connect only to hosts ``paddler.agent.model_hosts`` allows;
- a download larger than ``max_bytes`` stops (by ``Content-Length`` or by the bytes
  received);
- ``StallGuard``: every ``stall_floor_bytes`` of a download must arrive within
  ``stall_timeout_s`` of the previous ones (the response headers count as the start
  of the first window), so a server that drips one byte now and then is cut off
  however it spaces its bytes: the time spent below the floor adds up, it is not
  reset by every read. The same guard stops a download whose ``cancel`` event is set
  (a newer desired state): ``DownloadCancelled`` between two chunks, and a read
  blocked on a silent server is cut off too.

The defaults of the dataclass are the library's (any path, any host, no size limit):
``resolve_model`` called by hand stays as permissive as it was. The agent's
defaults come from ``AgentSettings``: public hosts only.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paddler.agent.source_errors import ModelSourceError, download_failed

STALL_FLOOR_BYTES = 64 * 1024
"""The bytes that must arrive in every stall window (64 KiB: a floor of about 1 KiB/s
with the default 60 s window, far below any usable link)."""

DEFAULT_STALL_TIMEOUT_S = 60.0

CANCEL_POLL_S = 0.1
"""How often the watchdog of a cancellable download looks at its cancel event."""


@dataclass(frozen=True)
class ModelSourceRules:
    model_dirs: tuple[Path, ...] = ()
    """Folders ``LocalToAgent`` paths must resolve into; empty: any path."""
    any_host: bool = True
    """Download from any host whatever its addresses (the library default)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names, IP addresses or networks (``10.0.0.0/8``) allowed even when their
    addresses are not public; ``*`` allows every host."""
    max_bytes: int | None = None
    """The largest file downloaded; ``None``: no limit."""
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
    stall_floor_bytes: int = STALL_FLOOR_BYTES

    @classmethod
    def from_settings(cls, settings: Any) -> ModelSourceRules:
        """The rules of an agent's settings (``paddler.agent.settings.AgentSettings``)."""
        return cls(
            model_dirs=tuple(Path(d).expanduser() for d in settings.model_dir),
            any_host="*" in settings.allow_model_host,
            allowed_hosts=tuple(settings.allow_model_host),
            max_bytes=settings.max_model_bytes or None,
            stall_timeout_s=settings.model_stall_timeout / 1000.0,
        )

    def local_path(self, path: str) -> Path:
        """The file ``path`` names, if it is one and lies in an allowed folder.

        Raises ``ModelSourceError``: ``ModelPathNotAllowed`` for a path that resolves
        outside every ``model_dirs`` (a symlink is followed before the check, so a link
        inside pointing outside is refused), ``ModelFileDoesNotExist`` otherwise.
        """
        candidate = Path(path).expanduser()
        if self.model_dirs:
            try:
                resolved = candidate.resolve(strict=True)
            except (OSError, RuntimeError):  # missing, a symlink loop, no permission
                resolved = None
            if resolved is not None and not any(
                resolved.is_relative_to(folder) for folder in self._resolved_dirs()
            ):
                raise ModelSourceError(
                    {"ModelPathNotAllowed": {"model_path": path}},
                    f"model path {path} is outside every --model-dir",
                )
            if resolved is not None and resolved.is_file():
                return resolved
        elif candidate.is_file():
            return candidate
        raise ModelSourceError(
            {"ModelFileDoesNotExist": {"model_path": path}},
            f"model file does not exist: {path}",
        )

    def _resolved_dirs(self) -> list[Path]:
        folders = []
        for folder in self.model_dirs:
            with contextlib.suppress(OSError, RuntimeError):
                folders.append(folder.resolve(strict=True))
        return folders

    def check_size(self, url: str, size: int) -> None:
        """``ModelTooLarge`` when ``size`` bytes exceed ``max_bytes``."""
        if self.max_bytes is not None and size > self.max_bytes:
            raise too_large(url, self.max_bytes, size)


class DownloadCancelled(ModelSourceError):
    """A download stopped because whoever asked for it no longer wants it (the agent
    got a newer desired state). What arrived stays on disk for the next attempt."""

    def __init__(self, url: str) -> None:
        error = "cancelled: a newer desired state replaced it"
        super().__init__(
            {"ModelDownloadFailed": {"url": url, "error": error}},
            f"download of {url} {error}",
        )


def too_large(url: str, max_bytes: int, size: int) -> ModelSourceError:
    return ModelSourceError(
        {"ModelTooLarge": {"url": url, "max_bytes": max_bytes, "size": size}},
        f"cannot download {url}: larger than --max-model-bytes ({size} > {max_bytes} bytes)",
    )


class StallGuard:
    """Counts the time a download spends below the floor rate, across reads.

    Every ``floor_bytes`` must arrive within ``timeout_s`` of the previous
    ``floor_bytes`` (or of the start). ``received(n)`` records progress and raises
    once the window is over; ``watch(sock)`` lets a watchdog thread shut a socket
    down when the window ends while a read is blocked (so headers or a body that
    never come are cut off in time too). Use it as a context manager.

    With a ``cancel`` event, ``received`` and ``check_cancel`` raise
    ``DownloadCancelled`` once it is set, and the watchdog shuts the sockets down
    within ``CANCEL_POLL_S`` of it.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float,
        floor_bytes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        cancel: threading.Event | None = None,
    ) -> None:
        self.url = url
        self._cancel = cancel
        self.timeout_s = timeout_s
        self.floor_bytes = floor_bytes
        self._clock = clock
        self._mark_time = clock()
        self._mark_bytes = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.stalled = False

    def __enter__(self) -> StallGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)

    def remaining_s(self) -> float:
        return self._mark_time + self.timeout_s - self._clock()

    def restart(self, received: int) -> None:
        """A new request starts a new window (bytes counted from ``received``)."""
        with self._lock:
            self._mark_time = self._clock()
            self._mark_bytes = received

    @property
    def cancelled(self) -> bool:
        return self._cancel is not None and self._cancel.is_set()

    @property
    def interrupted(self) -> bool:
        """Whether this guard ended the download (a stall or a cancel): a failed or
        short read is then its ``error()``, not the server's."""
        return self.stalled or self.cancelled

    def check_cancel(self) -> None:
        """Raise ``DownloadCancelled`` if the download was cancelled."""
        if self.cancelled:
            raise DownloadCancelled(self.url)

    def received(self, total: int) -> None:
        """``total`` bytes have arrived so far; raises when the download stalled or
        was cancelled."""
        self.check_cancel()
        with self._lock:
            if total - self._mark_bytes >= self.floor_bytes:
                self._mark_time = self._clock()
                self._mark_bytes = total
                return
        self.check()

    def check(self) -> None:
        if self.stalled or self.remaining_s() <= 0:
            self.stalled = True
            raise self.error()

    def error(self) -> ModelSourceError:
        if self.cancelled:
            return DownloadCancelled(self.url)
        return download_failed(
            self.url,
            f"stalled: less than {self.floor_bytes} bytes arrived in "
            f"{self.timeout_s:g} s (--model-stall-timeout)",
        )

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down if the window ends while it is open."""
        with self._lock:
            self._sockets.append(sock)
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="paddler-download-stall", daemon=True
                )
                self._watchdog.start()

    def _watch(self) -> None:
        while True:
            wait_s = max(self.remaining_s(), 0.0) + 0.01
            if self._cancel is not None:
                wait_s = min(wait_s, CANCEL_POLL_S)
            if self._done.wait(wait_s):
                return
            if self.cancelled:
                break
            if self.remaining_s() > 0:
                continue
            self.stalled = True
            break
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
