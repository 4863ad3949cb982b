"""Server-sent events, written by hand for every stream paddler serves.

One writer for the management streams (agents, buffered requests) and the
OpenAI-compatible ones: ``event`` frames one message, ``comment`` a keep-alive,
``DONE`` ends an OpenAI stream, ``set_headers`` prepares the response. Bytes are
what ``resp.stream`` sends, so nothing here touches Falcon's ``SSEvent``.

Framing follows the WHATWG event-stream format: every line of the data gets its
own ``data: `` field (a line break inside a value would otherwise end the field,
or the event), and a blank line ends the event.
"""

from __future__ import annotations

import re
from typing import Any

import falcon

from paddler.http.common import dumps

CONTENT_TYPE = "text/event-stream"

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
"""The three line endings an event-stream parser splits on."""


def _fields(name: bytes, text: bytes) -> bytes:
    return b"".join(name + line + b"\n" for line in _LINE_BREAK.split(text))


def event(value: Any, name: str | None = None) -> bytes:
    """One event: ``str`` and ``bytes`` as they are, anything else as compact JSON
    (``paddler.http.common.dumps``). A multi-line value becomes several ``data:``
    lines, which a client joins back with ``\\n``. ``name``: the event's type (an
    ``event:`` field, as the Responses and Messages APIs name theirs)."""
    if name is not None:
        return _fields(b"event: ", name.encode()) + event(value)
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    else:  # JSON text has its line breaks escaped: always one line
        return b"data: " + dumps(value).encode() + b"\n\n"
    if b"\n" in data or b"\r" in data:
        return _fields(b"data: ", data) + b"\n"
    return b"data: " + data + b"\n\n"


def comment(text: str = "") -> bytes:
    """A comment: clients ignore it, proxies and read timeouts see traffic."""
    return _fields(b": ", text.encode()) + b"\n"


DONE = event("[DONE]")
"""The last event of an OpenAI stream."""

KEEP_ALIVE = comment("keep-alive")


def set_headers(resp: falcon.Response) -> None:
    """Headers of an event stream: its content type, no caching, and no buffering in
    a reverse proxy (nginx honours ``X-Accel-Buffering``)."""
    resp.content_type = CONTENT_TYPE
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")
