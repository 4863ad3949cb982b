"""Turning token bytes into text pieces, per request: UTF-8 across token
boundaries and stop strings.

Pure-Python specification; the same file is compiled by Cython as
``paddler._core._text_c`` (a symlink), with the C types of ``_text_c.pxd``.
A token's bytes may end inside a UTF-8 character (byte-fallback tokens): the
incomplete tail waits for the next token.
Text that could be the beginning of a stop string is held back until it is
known not to be one, so a stop string never reaches the client, even when it
spans several tokens.
"""

from __future__ import annotations

import codecs

try:  # pragma: no cover
    import cython

    COMPILED: bool = bool(cython.compiled)
except ImportError:  # pragma: no cover
    COMPILED = False


class TextAssembler:
    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.stopped = False
        self.stopped_by: str | None = None
        """The stop string that ended the text, once one did."""

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that can be sent now."""
        if self.stopped:
            return ""
        text = self._decoder.decode(data)
        if not self._stop:
            return text
        pending = self._pending + text
        cut = -1
        matched = None
        for stop in self._stop:
            index = pending.find(stop)
            if index >= 0 and (cut < 0 or index < cut):
                cut = index
                matched = stop
        if cut >= 0:
            self.stopped = True
            self.stopped_by = matched
            self._pending = ""
            return pending[:cut]
        hold = 0
        size = len(pending)
        for stop in self._stop:
            longest = min(len(stop) - 1, size)
            for k in range(longest, hold, -1):
                if pending.endswith(stop[:k]):
                    hold = k
                    break
        self._pending = pending[size - hold :]
        return pending[: size - hold]

    def finish(self) -> str:
        """The text still held back, at the end of the request."""
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(b"", True)
        self._pending = ""
        return text
