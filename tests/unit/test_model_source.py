"""Tests of ``paddler.agent.model_source``: local paths, URL downloads, Hugging Face.

Every download comes from a ``ThreadingHTTPServer`` on 127.0.0.1 started per test (the
``server`` fixture); it serves a random payload with Range support, can ignore Range,
fail with 404/500, or cut the connection after N bytes, and it answers the requests
``huggingface_hub.hf_hub_download`` makes against its ``endpoint`` (``HEAD`` then ``GET``
of ``/{repo_id}/resolve/{revision}/{filename}``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from paddler.agent import model_source
from paddler.agent.model_source import ModelSourceError, cache_dir, resolve_model
from paddler.errors import ConfigurationError, PaddlerError

PAYLOAD = random.Random(20240611).randbytes(300_000)
REPO_ID = "paddler-test/tiny-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Seen:
    """One request as the server saw it, and the status it answered."""

    method: str
    path: str
    headers: dict[str, str]
    status: int = 0


@dataclass
class ServerState:
    payload: bytes = PAYLOAD
    etag: str = '"v1"'
    mode: str = "range"  # range | ignore_range | status | cut
    status: int = 404
    cut_after: int = 100_000
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.method == "GET"]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, *, head: bool) -> None:
        state = self.server.state
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        with state.lock:
            state.seen.append(seen)
        if "/resolve/" in self.path:
            self._hub(seen, head)
        elif state.mode == "status":
            self._status(seen, state.status)
        else:
            self._payload(seen, head, state.payload, state.etag)

    def _status(self, seen: Seen, status: int, headers: dict[str, str] | None = None) -> None:
        seen.status = status
        body = b"nope\n"
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _payload(self, seen: Seen, head: bool, data: bytes, etag: str, **extra: str) -> None:
        state = self.server.state
        start = 0
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        honour = state.mode != "ignore_range" and (if_range is None or if_range == etag)
        if wanted is not None and honour:
            match = re.fullmatch(r"bytes=(\d+)-", wanted)
            assert match is not None, wanted
            start = int(match.group(1))
            if start >= len(data):
                self._status(seen, 416, {"Content-Range": f"bytes */{len(data)}"})
                return
        status = 206 if start else 200
        seen.status = status
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for name, value in extra.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if head:
            return
        if state.mode == "cut":
            self.wfile.write(body[: state.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _hub(self, seen: Seen, head: bool) -> None:
        """``/{org}/{name}/resolve/{revision}/{filename}`` the way the Hub answers it."""
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
        assert match is not None, self.path
        repo_id, revision, filename = match.groups()
        if repo_id == "paddler-test/gated":
            self._status(seen, 403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
            return
        if repo_id == "paddler-test/broken":  # a 404 with none of the Hub's error headers
            self._status(seen, 404)
            return
        if repo_id != REPO_ID:
            self._status(seen, 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "nope"})
            return
        if revision not in ("main", COMMIT):
            self._status(seen, 404, {"X-Error-Code": "RevisionNotFound"})
            return
        if filename != "model.gguf":
            self._status(seen, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            return
        data = self.server.state.payload
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        self._payload(seen, head, data, etag, X_Repo_Commit=COMMIT)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: ServerState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up early is part of several tests


@dataclass
class Server:
    state: ServerState
    base: str

    def url(self, path: str = "/files/model.gguf") -> str:
        return self.base + path


@pytest.fixture
def server() -> Iterator[Server]:
    state = ServerState()
    httpd = _Server(state)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield Server(state, f"http://{host!s}:{port}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_source, "CHUNK_SIZE", 16 * 1024)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def url_source(url: str) -> dict[str, Any]:
    return {"Url": {"url": url}}


def download_failed(exc: ModelSourceError, url: str) -> str:
    """The error text of a ``ModelDownloadFailed`` issue about ``url``."""
    assert set(exc.issue) == {"ModelDownloadFailed"}
    details = exc.issue["ModelDownloadFailed"]
    assert details["url"] == url
    error = details["error"]
    assert isinstance(error, str) and error
    return error


# -- "None" and local files ------------------------------------------------------------


def test_none_means_no_model(tmp_path: Path) -> None:
    assert resolve_model("None", cache_dir=tmp_path) is None
    assert resolve_model(None, cache_dir=tmp_path) is None


def test_local_file_that_exists(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    assert resolve_model({"LocalToAgent": str(model)}, cache_dir=tmp_path) == model


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_local_file_that_does_not_exist(tmp_path: Path, what: str) -> None:
    path = tmp_path / "missing.gguf"
    if what == "directory":
        path.mkdir()
    with pytest.raises(ModelSourceError) as caught:
        resolve_model({"LocalToAgent": str(path)}, cache_dir=tmp_path)
    assert caught.value.issue == {"ModelFileDoesNotExist": {"model_path": str(path)}}
    assert caught.value.kind == "ModelFileDoesNotExist"
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, PaddlerError)


def test_not_a_model_source_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        resolve_model({"Ftp": "x"}, cache_dir=tmp_path)
    with pytest.raises(ConfigurationError):
        resolve_model(42, cache_dir=tmp_path)


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PADDLER_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PADDLER_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "paddler"


# -- URL downloads -----------------------------------------------------------------------


def test_url_download(server: Server, tmp_path: Path) -> None:
    url = server.url()
    path = resolve_model(url_source(url), cache_dir=tmp_path)
    assert path is not None
    assert path.parent == tmp_path / "models"
    assert re.fullmatch(r"model-[0-9a-f]{12}\.gguf", path.name)
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name(path.name + ".part").exists()
    meta = json.loads(path.with_name(path.name + ".meta.json").read_text())
    assert meta["url"] == url
    assert meta["size"] == len(PAYLOAD)
    assert meta["etag"] == '"v1"'
    assert meta["complete"] is True
    [get] = server.state.gets()
    assert "range" not in get.headers
    assert get.headers["accept-encoding"] == "identity"


def test_url_download_uses_paddler_cache_dir_by_default(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PADDLER_CACHE_DIR", str(tmp_path))
    path = resolve_model(url_source(server.url()))
    assert path is not None and path.parent == tmp_path / "models"


def test_different_urls_never_share_a_file(server: Server, tmp_path: Path) -> None:
    first = resolve_model(url_source(server.url("/a/model.gguf")), cache_dir=tmp_path)
    second = resolve_model(url_source(server.url("/b/model.gguf")), cache_dir=tmp_path)
    third = resolve_model(url_source(server.url("/b/model.gguf?v=2")), cache_dir=tmp_path)
    assert len({first, second, third}) == 3
    assert len(server.state.gets()) == 3


def test_complete_file_is_not_downloaded_again(server: Server, tmp_path: Path) -> None:
    url = server.url()
    first = resolve_model(url_source(url), cache_dir=tmp_path)
    hits = len(server.state.seen)
    calls: list[tuple[int, int | None, str]] = []
    second = resolve_model(url_source(url), cache_dir=tmp_path, progress=lambda *a: calls.append(a))
    assert second == first
    assert len(server.state.seen) == hits
    assert calls == [(len(PAYLOAD), len(PAYLOAD), "model.gguf")]


def test_a_file_without_its_record_is_downloaded_again(server: Server, tmp_path: Path) -> None:
    path = resolve_model(url_source(server.url()), cache_dir=tmp_path)
    assert path is not None
    path.with_name(path.name + ".meta.json").unlink()
    path.write_bytes(b"something else")
    assert resolve_model(url_source(server.url()), cache_dir=tmp_path) == path
    assert path.read_bytes() == PAYLOAD
    assert len(server.state.gets()) == 2


def test_progress_reports_increasing_bytes_and_the_final_total(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_source, "PROGRESS_INTERVAL_S", 0.0)
    calls: list[tuple[int, int | None, str]] = []
    resolve_model(url_source(server.url()), cache_dir=tmp_path, progress=lambda *a: calls.append(a))
    assert len(calls) > 3
    currents = [current for current, _, _ in calls]
    assert currents == sorted(currents)
    assert currents[0] < currents[-1]
    assert {total for _, total, _ in calls} == {len(PAYLOAD)}
    assert {name for _, _, name in calls} == {"model.gguf"}
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD), "model.gguf")


def test_progress_is_throttled(server: Server, tmp_path: Path) -> None:
    calls: list[tuple[int, int | None, str]] = []
    started = time.monotonic()
    resolve_model(url_source(server.url()), cache_dir=tmp_path, progress=lambda *a: calls.append(a))
    elapsed = time.monotonic() - started
    chunks = len(PAYLOAD) // model_source.CHUNK_SIZE
    assert len(calls) <= 2 + elapsed / model_source.PROGRESS_INTERVAL_S
    assert len(calls) < chunks
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD), "model.gguf")


def test_show_progress_draws_a_bar_on_stderr(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resolve_model(url_source(server.url()), cache_dir=tmp_path, show_progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "model.gguf" in captured.err and "100%" in captured.err


def test_no_bar_without_show_progress(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resolve_model(url_source(server.url()), cache_dir=tmp_path)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("status", [404, 500])
def test_http_errors_become_download_failed(server: Server, tmp_path: Path, status: int) -> None:
    server.state.mode = "status"
    server.state.status = status
    url = server.url()
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url), cache_dir=tmp_path)
    assert download_failed(caught.value, url).startswith(f"HTTP {status}")
    assert url in str(caught.value)
    assert not any(p.name.endswith((".gguf", ".part")) for p in (tmp_path / "models").iterdir())


def test_connection_refused(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/model.gguf"
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url), cache_dir=tmp_path)
    assert "refused" in download_failed(caught.value, url).lower()


def test_timeout_when_the_server_never_answers(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts connections into its backlog, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/model.gguf"
        started = time.monotonic()
        with pytest.raises(ModelSourceError) as caught:
            resolve_model(url_source(url), cache_dir=tmp_path, timeout_s=0.2)
        assert time.monotonic() - started < 5
    assert "timed out" in download_failed(caught.value, url)


def test_cut_connection_leaves_a_part_that_the_next_call_resumes(
    server: Server, tmp_path: Path
) -> None:
    server.state.mode = "cut"
    server.state.cut_after = 100_000
    url = server.url()
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url), cache_dir=tmp_path)
    error = download_failed(caught.value, url)
    assert f"100000 of {len(PAYLOAD)} bytes" in error
    [part] = (tmp_path / "models").glob("*.part")
    assert part.stat().st_size == 100_000
    assert not part.with_name(part.name.removesuffix(".part")).exists()

    server.state.mode = "range"
    calls: list[tuple[int, int | None, str]] = []
    path = resolve_model(url_source(url), cache_dir=tmp_path, progress=lambda *a: calls.append(a))
    assert path is not None and path.read_bytes() == PAYLOAD
    assert not part.exists()
    first, second = server.state.gets()
    assert "range" not in first.headers
    assert second.headers["range"] == "bytes=100000-"
    assert second.headers["if-range"] == '"v1"'
    assert second.status == 206
    assert calls[0][0] == 100_000
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD), "model.gguf")


def test_resume_against_a_server_that_ignores_range(server: Server, tmp_path: Path) -> None:
    server.state.mode = "cut"
    url = server.url()
    with pytest.raises(ModelSourceError):
        resolve_model(url_source(url), cache_dir=tmp_path)
    server.state.mode = "ignore_range"
    path = resolve_model(url_source(url), cache_dir=tmp_path)
    assert path is not None and path.read_bytes() == PAYLOAD
    second = server.state.gets()[1]
    assert second.headers["range"] == "bytes=100000-"
    assert second.status == 200


def test_resume_of_a_file_that_changed_starts_over(server: Server, tmp_path: Path) -> None:
    server.state.mode = "cut"
    url = server.url()
    with pytest.raises(ModelSourceError):
        resolve_model(url_source(url), cache_dir=tmp_path)
    server.state.mode = "range"
    server.state.payload = changed = PAYLOAD[::-1]
    server.state.etag = '"v2"'
    path = resolve_model(url_source(url), cache_dir=tmp_path)
    assert path is not None and path.read_bytes() == changed
    second = server.state.gets()[1]
    assert second.headers["if-range"] == '"v1"'
    assert second.status == 200


def test_a_complete_part_answered_with_416_is_kept(server: Server, tmp_path: Path) -> None:
    server.state.mode = "cut"
    url = server.url()
    with pytest.raises(ModelSourceError):
        resolve_model(url_source(url), cache_dir=tmp_path)
    [part] = (tmp_path / "models").glob("*.part")
    part.write_bytes(PAYLOAD)  # as if the last bytes arrived but the process died
    server.state.mode = "range"
    path = resolve_model(url_source(url), cache_dir=tmp_path)
    assert path is not None and path.read_bytes() == PAYLOAD
    second = server.state.gets()[1]
    assert second.headers["range"] == f"bytes={len(PAYLOAD)}-"
    assert second.status == 416
    assert len(server.state.gets()) == 2


def test_an_oversized_part_answered_with_416_starts_over(server: Server, tmp_path: Path) -> None:
    server.state.mode = "cut"
    url = server.url()
    with pytest.raises(ModelSourceError):
        resolve_model(url_source(url), cache_dir=tmp_path)
    [part] = (tmp_path / "models").glob("*.part")
    part.write_bytes(PAYLOAD + b"junk")
    server.state.mode = "range"
    path = resolve_model(url_source(url), cache_dir=tmp_path)
    assert path is not None and path.read_bytes() == PAYLOAD
    statuses = [s.status for s in server.state.gets()[1:]]
    assert statuses == [416, 200]


def test_a_part_without_a_record_is_not_resumed(server: Server, tmp_path: Path) -> None:
    url = server.url()
    path = resolve_model(url_source(url), cache_dir=tmp_path)
    assert path is not None
    for name in (path.name, path.name + ".meta.json"):
        (path.parent / name).unlink()
    (path.parent / (path.name + ".part")).write_bytes(b"x" * 1000)
    assert resolve_model(url_source(url), cache_dir=tmp_path) == path
    assert path.read_bytes() == PAYLOAD
    assert "range" not in server.state.gets()[1].headers


def test_disk_error_becomes_download_failed(server: Server, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"")
    url = server.url()
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url), cache_dir=not_a_directory)
    assert "cannot create cache directory" in download_failed(caught.value, url)
    assert server.state.seen == []


@pytest.mark.skipif(sys.platform == "win32", reason="advisory locks are POSIX only here")
def test_a_download_in_progress_elsewhere_is_not_disturbed(server: Server, tmp_path: Path) -> None:
    import fcntl

    url = server.url()
    name = model_source._cache_file_name(url)
    (tmp_path / "models").mkdir()
    with (tmp_path / "models" / f"{name}.lock").open("w") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ModelSourceError) as caught:
            resolve_model(url_source(url), cache_dir=tmp_path)
    assert "another process" in download_failed(caught.value, url)
    assert server.state.seen == []
    path = resolve_model(url_source(url), cache_dir=tmp_path)
    assert path is not None and path.read_bytes() == PAYLOAD


def test_only_http_urls_are_downloaded(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/model.gguf"
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url), cache_dir=tmp_path)
    assert "http" in download_failed(caught.value, url)


# -- Hugging Face ------------------------------------------------------------------------


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode, no telemetry, no endpoint, token or cache from the environment."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, at import


def hf_source(repo_id: str = REPO_ID, filename: str = "model.gguf", revision: str = "main") -> Any:
    return {"HuggingFace": {"repo_id": repo_id, "revision": revision, "filename": filename}}


@pytest.mark.usefixtures("hub_env")
def test_hugging_face_download_from_a_local_hub(server: Server, tmp_path: Path) -> None:
    calls: list[tuple[int, int | None, str]] = []
    path = resolve_model(
        hf_source(),
        cache_dir=tmp_path,
        hf_endpoint=server.base,
        progress=lambda *a: calls.append(a),
    )
    assert path is not None
    assert path.read_bytes() == PAYLOAD
    assert (tmp_path / "hf") in path.parents
    assert path.name == "model.gguf"
    requests = [(s.method, s.path, s.status) for s in server.state.seen]
    resolve = f"/{REPO_ID}/resolve/main/model.gguf"
    assert requests == [("HEAD", resolve, 200), ("GET", resolve, 200)]
    assert calls[0] == (0, len(PAYLOAD), "model.gguf")
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD), "model.gguf")


@pytest.mark.usefixtures("hub_env")
def test_hugging_face_progress_is_hooked(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    monkeypatch.setattr(model_source, "PROGRESS_INTERVAL_S", 0.0)
    calls: list[tuple[int, int | None, str]] = []
    resolve_model(
        hf_source(),
        cache_dir=tmp_path,
        hf_endpoint=server.base,
        progress=lambda *a: calls.append(a),
    )
    currents = [current for current, _, _ in calls]
    assert len(calls) > 3
    assert currents == sorted(currents)
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD), "model.gguf")


@pytest.mark.usefixtures("hub_env")
def test_hugging_face_endpoint_from_environment_and_cache_reuse(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    first = resolve_model(hf_source(), cache_dir=tmp_path)
    second = resolve_model(hf_source(), cache_dir=tmp_path)
    assert first == second and first is not None
    assert first.read_bytes() == PAYLOAD
    assert [s.method for s in server.state.seen] == ["HEAD", "GET", "HEAD"]


@pytest.mark.usefixtures("hub_env")
def test_hugging_face_show_progress_draws_on_stderr(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resolve_model(hf_source(), cache_dir=tmp_path, hf_endpoint=server.base, show_progress=True)
    assert "100%" in capsys.readouterr().err
    resolve_model(hf_source(revision=COMMIT), cache_dir=tmp_path / "again", hf_endpoint=server.base)
    assert capsys.readouterr().err == ""


@pytest.mark.usefixtures("hub_env")
@pytest.mark.parametrize(
    ("repo_id", "revision", "filename"),
    [
        ("nobody/missing", "main", "model.gguf"),
        (REPO_ID, "no-such-branch", "model.gguf"),
        (REPO_ID, "main", "missing.gguf"),
    ],
)
def test_hugging_face_model_that_does_not_exist(
    server: Server, tmp_path: Path, repo_id: str, revision: str, filename: str
) -> None:
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(
            hf_source(repo_id, filename, revision), cache_dir=tmp_path, hf_endpoint=server.base
        )
    model_path = f"{repo_id}/{revision}/{filename}"
    assert caught.value.issue == {"HuggingFaceModelDoesNotExist": {"model_path": model_path}}
    assert [s.method for s in server.state.seen] == ["HEAD"]


@pytest.mark.usefixtures("hub_env")
def test_hugging_face_gated_repo(server: Server, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(hf_source("paddler-test/gated"), cache_dir=tmp_path, hf_endpoint=server.base)
    model_path = "paddler-test/gated/main/model.gguf"
    assert caught.value.issue == {"HuggingFacePermissions": {"model_path": model_path}}


@pytest.mark.usefixtures("hub_env")
def test_hugging_face_endpoint_that_is_not_a_hub(server: Server, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(hf_source("paddler-test/broken"), cache_dir=tmp_path, hf_endpoint=server.base)
    url = f"{server.base}/paddler-test/broken/resolve/main/model.gguf"
    assert "404" in download_failed(caught.value, url)


@pytest.mark.usefixtures("hub_env")
def test_hugging_face_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from huggingface_hub.utils import _http

    # huggingface_hub retries an unreachable Hub with 1+2+4+8+8 s of backoff: skip the waits
    no_wait = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if n[0] != "_"})
    no_wait.sleep = lambda seconds: None
    monkeypatch.setattr(_http, "time", no_wait)
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(hf_source(), cache_dir=tmp_path, hf_endpoint=endpoint, timeout_s=2)
    url = f"{endpoint}/{REPO_ID}/resolve/main/model.gguf"
    assert "connect" in download_failed(caught.value, url).lower()
