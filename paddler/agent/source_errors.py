"""How a model source fails: ``ModelSourceError`` and its one-line error texts."""

from __future__ import annotations

import socket
import urllib.error
from typing import Any

from paddler.errors import PaddlerError

MAX_ERROR_CHARS = 500
"""The longest error text an issue carries."""


class ModelSourceError(PaddlerError):
    """A model source that cannot become a local file.

    ``issue`` is the tagged value the agent reports, with exactly one key: e.g.
    ``{"ModelFileDoesNotExist": {"model_path": "/x.gguf"}}``,
    ``{"HuggingFaceModelDoesNotExist": {"model_path": "owner/repo/main/x.gguf"}}``,
    ``{"HuggingFacePermissions": {"model_path": ...}}`` or
    ``{"ModelDownloadFailed": {"url": ..., "error": ...}}``.
    """

    def __init__(self, issue: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.issue = issue
        self.message = message

    @property
    def kind(self) -> str:
        """The tag of the issue, e.g. ``"ModelDownloadFailed"``."""
        return next(iter(self.issue))


def download_failed(url: str, error: str) -> ModelSourceError:
    """A ``ModelDownloadFailed`` issue for ``url``."""
    return ModelSourceError(
        {"ModelDownloadFailed": {"url": url, "error": error}},
        f"cannot download {url}: {error}",
    )


def readable(exc: BaseException) -> str:
    """One line naming an exception: its type when the text alone would be vague."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return readable(exc.reason) if isinstance(exc.reason, BaseException) else str(exc.reason)
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, TimeoutError):
        text = " ".join(str(exc).split())
        return f"timed out ({text})" if text and text != "timed out" else "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename:
            text = f"{text}: {exc.filename}"
    else:
        text = " ".join(str(exc).split())
    name = type(exc).__name__
    text = f"{name}: {text}" if text else name
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text
