"""The operator's rules for model sources: ``--model-dir``, ``--allow-model-host``,
``--max-model-bytes``, the total-stall rule, and the ``sha256`` of a desired state.

Every download comes from a ``ThreadingHTTPServer`` on 127.0.0.1 started per test; it
serves a payload, redirects, drips bytes, or answers like the Hugging Face Hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from paddler.agent import model_hosts
from paddler.agent.model_hosts import address_kind
from paddler.agent.model_source import ModelSourceError, resolve_model
from paddler.agent.settings import AgentSettings
from paddler.agent.source_rules import ModelSourceRules, StallGuard
from paddler.errors import ConfigurationError
from paddler.protocol.desired_state import validate_desired_state

PAYLOAD = random.Random(7).randbytes(200_000)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
WRONG = "0" * 64
REPO_ID = "paddler-test/tiny-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

AGENT = ModelSourceRules(any_host=False)
"""An agent's rules with no option given: public hosts only."""


@dataclass
class State:
    mode: str = "payload"  # payload | chunked | redirect | drip | silent | drip_headers
    redirect_to: str = ""
    drip_interval_s: float = 0.02
    announce: int | None = None
    paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, *, head: bool) -> None:
        state = self.server.state
        with state.lock:
            state.paths.append(f"{self.command} {self.path}")
        if "/resolve/" in self.path:
            self._hub(head)
            return
        mode = state.mode
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", state.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "drip_headers":
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
                if not self._drip(bytes([byte])):
                    return
            return
        if mode == "chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(PAYLOAD), 16_384):
                piece = PAYLOAD[start : start + 16_384]
                try:
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                except OSError:
                    return
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(state.announce or len(PAYLOAD)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        if head:
            return
        if mode == "silent":
            time.sleep(5)
            return
        if mode == "drip":
            for index in range(len(PAYLOAD)):
                if not self._drip(PAYLOAD[index : index + 1]):
                    return
            return
        with contextlib.suppress(OSError):
            self.wfile.write(PAYLOAD)

    def _drip(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            return False
        time.sleep(self.server.state.drip_interval_s)
        return True

    def _hub(self, head: bool) -> None:
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
        assert match is not None, self.path
        state = self.server.state
        if state.mode == "redirect":  # the way the Hub sends a large file to its CDN
            self.send_response(302)
            self.send_header("Location", state.redirect_to)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Linked-Etag", f'"{DIGEST}"')
            self.send_header("X-Linked-Size", str(len(PAYLOAD)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.send_header("ETag", f'"{DIGEST}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if not head:
            self.wfile.write(PAYLOAD)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, state: State) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up are part of these tests


@dataclass
class Server:
    state: State
    port: int

    def url(self, path: str = "/files/model.gguf", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _serve() -> Iterator[Server]:
    state = State()
    httpd = _Server(state)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield Server(state, httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[Server]:
    yield from _serve()


@pytest.fixture
def other_server() -> Iterator[Server]:
    yield from _serve()


def url_source(url: str, sha256: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"url": url}
    if sha256 is not None:
        spec["sha256"] = sha256
    return {"Url": spec}


def issue_of(exc: ModelSourceError, kind: str) -> dict[str, Any]:
    assert set(exc.issue) == {kind}, exc.issue
    details: dict[str, Any] = exc.issue[kind]
    return details


# -- --model-dir -------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "models", tmp_path / "elsewhere"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "in.gguf").write_bytes(b"GGUF")
    (outside / "out.gguf").write_bytes(b"GGUF")
    return allowed, outside


def test_a_local_path_inside_a_model_dir_loads(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    rules = ModelSourceRules(model_dirs=(allowed,))
    path = resolve_model({"LocalToAgent": str(allowed / "in.gguf")}, rules=rules)
    assert path == (allowed / "in.gguf").resolve()


@pytest.mark.parametrize("how", ["outside", "dot-dot", "symlink to outside"])
def test_a_local_path_outside_every_model_dir_is_an_issue(
    folders: tuple[Path, Path], how: str
) -> None:
    allowed, outside = folders
    path = {
        "outside": outside / "out.gguf",
        "dot-dot": allowed / ".." / "elsewhere" / "out.gguf",
        "symlink to outside": allowed / "link.gguf",
    }[how]
    if how == "symlink to outside":
        path.symlink_to(outside / "out.gguf")
    rules = ModelSourceRules(model_dirs=(allowed,))
    with pytest.raises(ModelSourceError) as caught:
        resolve_model({"LocalToAgent": str(path)}, rules=rules)
    assert caught.value.issue == {"ModelPathNotAllowed": {"model_path": str(path)}}


def test_a_model_dir_given_through_a_symlink_still_holds_its_files(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    allowed, _ = folders
    alias = tmp_path / "alias"
    alias.symlink_to(allowed)
    (allowed / "inner.gguf").symlink_to(allowed / "in.gguf")  # a link that stays inside
    rules = ModelSourceRules(model_dirs=(alias,))
    assert (
        resolve_model({"LocalToAgent": str(alias / "inner.gguf")}, rules=rules)
        == (allowed / "in.gguf").resolve()
    )


def test_a_missing_file_inside_a_model_dir_is_still_missing(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    missing = str(allowed / "missing.gguf")
    with pytest.raises(ModelSourceError) as caught:
        resolve_model({"LocalToAgent": missing}, rules=ModelSourceRules(model_dirs=(allowed,)))
    assert caught.value.issue == {"ModelFileDoesNotExist": {"model_path": missing}}


def test_without_a_model_dir_any_path_loads(folders: tuple[Path, Path]) -> None:
    _, outside = folders
    source = {"LocalToAgent": str(outside / "out.gguf")}
    assert resolve_model(source, rules=AGENT) == outside / "out.gguf"


# -- --allow-model-host --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "shared (carrier-grade NAT)"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a00:1", "private"),
        ("2002:7f00:1::", "loopback"),
    ],
)
def test_what_counts_as_a_public_address(address: str, kind: str | None) -> None:
    assert address_kind(ipaddress.ip_address(address)) == kind


def test_a_url_on_a_loopback_address_is_refused_unless_listed(
    server: Server, tmp_path: Path
) -> None:
    url = server.url()
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url), cache_dir=tmp_path, rules=AGENT)
    details = issue_of(caught.value, "ModelHostNotAllowed")
    assert details["url"] == url and details["host"] == "127.0.0.1"
    assert "loopback" in details["error"] and "--allow-model-host" in details["error"]
    assert server.state.paths == []
    assert not list((tmp_path / "models").glob("*.gguf"))


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.0/8", "*"])
def test_a_listed_host_address_or_network_is_allowed(
    server: Server, tmp_path: Path, entry: str
) -> None:
    rules = ModelSourceRules(any_host=False, allowed_hosts=(entry,))
    path = resolve_model(url_source(server.url()), cache_dir=tmp_path, rules=rules)
    assert path is not None and path.read_bytes() == PAYLOAD


def test_a_listed_name_is_allowed_whatever_its_addresses(server: Server, tmp_path: Path) -> None:
    rules = ModelSourceRules(any_host=False, allowed_hosts=("LocalHost.",))
    path = resolve_model(url_source(server.url(host="localhost")), cache_dir=tmp_path, rules=rules)
    assert path is not None and path.read_bytes() == PAYLOAD


def test_a_redirect_to_a_refused_host_is_refused(
    server: Server, other_server: Server, tmp_path: Path
) -> None:
    server.state.mode = "redirect"
    server.state.redirect_to = other_server.url()  # 127.0.0.1: loopback, and not listed
    rules = ModelSourceRules(any_host=False, allowed_hosts=("localhost",))
    url = server.url(host="localhost")
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url), cache_dir=tmp_path, rules=rules)
    details = issue_of(caught.value, "ModelHostNotAllowed")
    assert details["host"] == "127.0.0.1"
    assert details["url"] == url
    assert server.state.paths == ["GET /files/model.gguf"]
    assert other_server.state.paths == []


def test_a_redirect_to_an_allowed_host_is_followed(
    server: Server, other_server: Server, tmp_path: Path
) -> None:
    server.state.mode = "redirect"
    server.state.redirect_to = other_server.url("/cdn/model.gguf")
    rules = ModelSourceRules(any_host=False, allowed_hosts=("127.0.0.1",))
    path = resolve_model(url_source(server.url()), cache_dir=tmp_path, rules=rules)
    assert path is not None and path.read_bytes() == PAYLOAD
    assert other_server.state.paths == ["GET /cdn/model.gguf"]


def test_the_address_checked_is_the_address_connected_to(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One resolution per connection: a name that answers differently the second time
    (DNS rebinding) never gets the second answer used."""
    answers: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        answers.append(host)
        if len(answers) > 1:  # a second lookup would get a refused address
            return real("10.255.255.1", port, *args, **kwargs)
        return real("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(model_hosts.socket, "getaddrinfo", rebinding)
    rules = ModelSourceRules(any_host=False, allowed_hosts=("127.0.0.0/8",))
    path = resolve_model(
        url_source(server.url(host="models.test")), cache_dir=tmp_path, rules=rules
    )
    assert path is not None and path.read_bytes() == PAYLOAD
    assert answers == ["models.test"]


def test_an_unknown_host_is_a_download_failure(tmp_path: Path) -> None:
    url = "http://no-such-host.invalid/model.gguf"
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url), cache_dir=tmp_path, rules=AGENT)
    assert "resolve" in issue_of(caught.value, "ModelDownloadFailed")["error"]


# -- --max-model-bytes --------------------------------------------------------------------


def test_a_download_larger_than_its_content_length_allows_stops(
    server: Server, tmp_path: Path
) -> None:
    rules = ModelSourceRules(max_bytes=len(PAYLOAD) - 1)
    url = server.url()
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url), cache_dir=tmp_path, rules=rules)
    assert issue_of(caught.value, "ModelTooLarge") == {
        "url": url,
        "max_bytes": len(PAYLOAD) - 1,
        "size": len(PAYLOAD),
    }
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.endswith((".gguf", ".part"))]


def test_a_download_without_a_length_stops_at_the_limit(server: Server, tmp_path: Path) -> None:
    server.state.mode = "chunked"
    rules = ModelSourceRules(max_bytes=50_000)
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(server.url()), cache_dir=tmp_path, rules=rules)
    details = issue_of(caught.value, "ModelTooLarge")
    assert 50_000 < details["size"] <= 50_000 + 16_384 + 8
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.endswith((".gguf", ".part"))]


def test_a_download_within_the_limit_completes(server: Server, tmp_path: Path) -> None:
    server.state.mode = "chunked"
    rules = ModelSourceRules(max_bytes=len(PAYLOAD))
    path = resolve_model(url_source(server.url()), cache_dir=tmp_path, rules=rules)
    assert path is not None and path.read_bytes() == PAYLOAD


# -- the total-stall rule -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["drip", "silent", "drip_headers"])
def test_a_stalling_server_is_cut_off_within_the_stall_timeout(
    server: Server, tmp_path: Path, mode: str
) -> None:
    """A byte every 20 ms never trips a per-read timeout of 30 s; the total rule (1024
    bytes within every 0.5 s) ends it all the same, headers included."""
    server.state.mode = mode
    rules = ModelSourceRules(stall_timeout_s=0.5, stall_floor_bytes=1024)
    url = server.url()
    started = time.monotonic()
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url), cache_dir=tmp_path, rules=rules, timeout_s=30)
    elapsed = time.monotonic() - started
    assert 0.45 < elapsed < 3, elapsed
    error = issue_of(caught.value, "ModelDownloadFailed")["error"]
    assert error.startswith("stalled"), error
    assert not list((tmp_path / "models").glob("*.gguf"))


def test_the_stall_window_moves_with_every_floor_of_bytes() -> None:
    now = [0.0]
    guard = StallGuard("http://x/m.gguf", 10.0, 100, clock=lambda: now[0])
    for step in range(1, 50):  # 100 bytes every 9 s: slow, but above the floor
        now[0] = step * 9.0
        guard.received(step * 100)
    now[0] += 5.0
    guard.received(4900 + 99)  # below the floor, but the window is not over yet
    now[0] += 5.5
    with pytest.raises(ModelSourceError) as caught:
        guard.received(4900 + 99)
    assert "stalled" in str(caught.value)


# -- sha256 -------------------------------------------------------------------------------


def test_a_right_sha256_loads_and_is_remembered(server: Server, tmp_path: Path) -> None:
    source = url_source(server.url(), DIGEST.upper())
    path = resolve_model(source, cache_dir=tmp_path)
    assert path is not None and path.read_bytes() == PAYLOAD
    assert resolve_model(source, cache_dir=tmp_path) == path
    assert server.state.paths == ["GET /files/model.gguf"]


def test_a_wrong_sha256_is_an_issue_and_the_file_is_not_kept(
    server: Server, tmp_path: Path
) -> None:
    url = server.url()
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url, WRONG), cache_dir=tmp_path)
    assert caught.value.issue == {
        "ModelChecksumMismatch": {"model_path": url, "expected": WRONG, "actual": DIGEST}
    }
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []
    # the next attempt downloads again, and a right digest then loads
    assert resolve_model(url_source(url, DIGEST), cache_dir=tmp_path) is not None
    assert len(server.state.paths) == 2


def test_a_cached_file_is_checked_against_a_new_sha256(server: Server, tmp_path: Path) -> None:
    url = server.url()
    path = resolve_model(url_source(url), cache_dir=tmp_path)
    assert path is not None
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url, WRONG), cache_dir=tmp_path)
    assert issue_of(caught.value, "ModelChecksumMismatch")["actual"] == DIGEST
    assert not path.exists()


def test_a_cached_file_changed_on_disk_is_hashed_again(server: Server, tmp_path: Path) -> None:
    url = server.url()
    path = resolve_model(url_source(url, DIGEST), cache_dir=tmp_path)
    assert path is not None
    path.write_bytes(PAYLOAD[::-1])  # same size, new mtime
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(url_source(url, DIGEST), cache_dir=tmp_path)
    assert issue_of(caught.value, "ModelChecksumMismatch")["expected"] == DIGEST


def test_sha256_in_the_desired_state_is_validated() -> None:
    state = validate_desired_state(
        {"model": {"Url": {"url": "https://example.com/m.gguf", "sha256": DIGEST.upper()}}}
    )
    assert state["model"] == {"Url": {"url": "https://example.com/m.gguf", "sha256": DIGEST}}
    plain = validate_desired_state({"model": {"Url": "https://example.com/m.gguf"}})
    assert plain["model"] == {"Url": {"url": "https://example.com/m.gguf"}}
    hub = {"repo_id": "a/b", "filename": "m.gguf", "sha256": DIGEST}
    assert validate_desired_state({"model": {"HuggingFace": hub}})["model"]["HuggingFace"] == {
        **hub,
        "revision": "main",
    }
    for bad in ("abc", "g" * 64, DIGEST + "0", 42):
        with pytest.raises(ConfigurationError) as caught:
            validate_desired_state({"model": {"Url": {"url": "https://x/m", "sha256": bad}}})
        assert caught.value.field == "model.Url.sha256"
        assert "64 hexadecimal characters" in caught.value.message


# -- Hugging Face ---------------------------------------------------------------------------


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def hf_source(sha256: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"repo_id": REPO_ID, "revision": "main", "filename": "model.gguf"}
    if sha256 is not None:
        spec["sha256"] = sha256
    return {"HuggingFace": spec}


@pytest.mark.usefixtures("hub_env")
def test_a_hugging_face_endpoint_on_a_loopback_address_is_refused_unless_listed(
    server: Server, tmp_path: Path
) -> None:
    endpoint = server.url("")
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(hf_source(), cache_dir=tmp_path, hf_endpoint=endpoint, rules=AGENT)
    assert "loopback" in issue_of(caught.value, "ModelHostNotAllowed")["error"]
    assert server.state.paths == []
    rules = ModelSourceRules(any_host=False, allowed_hosts=("127.0.0.1",))
    path = resolve_model(hf_source(), cache_dir=tmp_path, hf_endpoint=endpoint, rules=rules)
    assert path is not None and path.read_bytes() == PAYLOAD


@pytest.mark.usefixtures("hub_env")
def test_a_hugging_face_redirect_to_a_refused_host_is_refused(
    server: Server, other_server: Server, tmp_path: Path
) -> None:
    server.state.mode = "redirect"
    server.state.redirect_to = other_server.url("/cdn/model.gguf")  # 127.0.0.1: not listed
    rules = ModelSourceRules(any_host=False, allowed_hosts=("localhost",))
    endpoint = server.url("", host="localhost")
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(hf_source(), cache_dir=tmp_path, hf_endpoint=endpoint, rules=rules)
    assert issue_of(caught.value, "ModelHostNotAllowed")["host"] == "127.0.0.1"
    assert other_server.state.paths == []
    listed = ModelSourceRules(any_host=False, allowed_hosts=("localhost", "127.0.0.1"))
    path = resolve_model(hf_source(), cache_dir=tmp_path, hf_endpoint=endpoint, rules=listed)
    assert path is not None and path.read_bytes() == PAYLOAD
    assert other_server.state.paths == ["GET /cdn/model.gguf"]


@pytest.mark.usefixtures("hub_env")
def test_a_hugging_face_file_larger_than_the_limit_stops(server: Server, tmp_path: Path) -> None:
    rules = ModelSourceRules(max_bytes=1000)
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(hf_source(), cache_dir=tmp_path, hf_endpoint=server.url(""), rules=rules)
    assert issue_of(caught.value, "ModelTooLarge")["size"] == len(PAYLOAD)


@pytest.mark.usefixtures("hub_env")
def test_a_hugging_face_sha256_is_checked(server: Server, tmp_path: Path) -> None:
    endpoint = server.url("")
    with pytest.raises(ModelSourceError) as caught:
        resolve_model(hf_source(WRONG), cache_dir=tmp_path, hf_endpoint=endpoint)
    details = issue_of(caught.value, "ModelChecksumMismatch")
    assert details == {
        "model_path": f"{REPO_ID}/main/model.gguf",
        "expected": WRONG,
        "actual": DIGEST,
    }
    path = resolve_model(hf_source(DIGEST), cache_dir=tmp_path, hf_endpoint=endpoint)
    assert path is not None and path.read_bytes() == PAYLOAD


# -- settings -----------------------------------------------------------------------------


def test_agent_settings_become_rules(tmp_path: Path) -> None:
    default = ModelSourceRules.from_settings(AgentSettings())
    assert default == ModelSourceRules(any_host=False)
    assert default.max_bytes is None and default.stall_timeout_s == 60.0
    rules = ModelSourceRules.from_settings(
        AgentSettings(
            model_dir=[str(tmp_path)],
            allow_model_host=["10.0.0.0/8", "mirror.internal"],
            max_model_bytes=1 << 30,
            model_stall_timeout=5_000,
        )
    )
    assert rules.model_dirs == (tmp_path,)
    assert rules.allowed_hosts == ("10.0.0.0/8", "mirror.internal") and not rules.any_host
    assert rules.max_bytes == 1 << 30 and rules.stall_timeout_s == 5.0
    assert ModelSourceRules.from_settings(AgentSettings(allow_model_host=["*"])).any_host
