"""A local HTTP server that sends one file slowly (``chunk_bytes`` every ``interval_s``),
honours ``Range``, and tells which requests it saw and how many are still being sent.
``silent`` sends the headers and then nothing until the client hangs up."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class SlowFile:
    payload: bytes
    chunk_bytes: int = 2048
    interval_s: float = 0.05
    silent: bool = False
    ranges: list[str | None] = field(default_factory=list)
    """The ``Range`` header of every GET (``None``: none)."""
    sent: int = 0
    """Body bytes sent so far, all requests together."""
    sending: int = 0
    """Requests whose body is being sent now."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self, condition: Any, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition(self):
            assert time.monotonic() < deadline, "the server did not get there in time"
            time.sleep(0.01)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        """What the Hugging Face Hub answers before a download."""
        file = self.server.file
        self.send_response(200)
        self.send_header("Content-Length", str(len(file.payload)))
        self.send_header("ETag", f'"{hashlib.sha256(file.payload).hexdigest()}"')
        self.send_header("X-Repo-Commit", HUB_COMMIT)
        self.end_headers()

    def do_GET(self) -> None:
        file = self.server.file
        header = self.headers.get("Range")
        with file.lock:
            file.ranges.append(header)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", header or "")
        if match is not None:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header(
                "Content-Range", f"bytes {start}-{len(file.payload) - 1}/{len(file.payload)}"
            )
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(file.payload) - start))
        self.send_header("ETag", f'"{hashlib.sha256(file.payload).hexdigest()}"')
        self.send_header("X-Repo-Commit", HUB_COMMIT)
        self.end_headers()
        self.wfile.flush()
        with file.lock:
            file.sending += 1
        try:
            self._send(file, start)
        finally:
            with file.lock:
                file.sending -= 1
            self.close_connection = True

    def _send(self, file: SlowFile, start: int) -> None:
        position = start
        while position < len(file.payload):
            if file.silent:
                try:  # a client that hangs up shows as a readable, empty socket
                    if self.connection.recv(1) == b"":
                        return
                except OSError:
                    return
                continue
            piece = file.payload[position : position + file.chunk_bytes]
            try:
                self.wfile.write(piece)
                self.wfile.flush()
            except OSError:
                return
            position += len(piece)
            with file.lock:
                file.sent += len(piece)
            if file.interval_s:
                time.sleep(file.interval_s)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, file: SlowFile) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.file = file

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up are what these tests do


@contextmanager
def serve_slowly(file: SlowFile) -> Iterator[str]:
    """Serve ``file`` at the URL yielded (any path: the server's root URL is a Hub
    endpoint for any repository and file name too)."""
    httpd = _Server(file)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/models/slow.gguf"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
