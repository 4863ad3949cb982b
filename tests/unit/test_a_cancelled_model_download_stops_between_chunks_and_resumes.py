"""``resolve_model(..., cancel=event)``: once the event is set, a download stops between
two chunks (or, on a server that sends nothing, as soon as the watchdog cuts the read)
with ``DownloadCancelled``; a URL's ``.part`` stays, and the next call resumes it. A
Hugging Face download stops at its next progress report."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

from paddler.agent.model_source import DownloadCancelled, ModelSourceError, resolve_model
from tests.unit.slow_file_server import SlowFile, serve_slowly

PAYLOAD = random.Random(11).randbytes(400_000)


class _Download(threading.Thread):
    def __init__(self, url: str, cache: Path, cancel: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.cache, self.cancel = url, cache, cancel
        self.progress: list[tuple[int, int | None]] = []
        self.error: BaseException | None = None
        self.path: Path | None = None

    def run(self) -> None:
        try:
            self.path = resolve_model(
                {"Url": {"url": self.url}},
                cache_dir=self.cache,
                progress=lambda current, total, _name: self.progress.append((current, total)),
                cancel=self.cancel,
            )
        except BaseException as exc:
            self.error = exc


def _cancel_after_some_bytes(file: SlowFile, url: str, cache: Path) -> _Download:
    cancel = threading.Event()
    download = _Download(url, cache, cancel)
    download.start()
    file.wait(lambda f: f.sent >= 20_000)
    cancelled_at = time.monotonic()
    cancel.set()
    download.join(timeout=5)
    assert not download.is_alive(), "the download did not stop"
    assert time.monotonic() - cancelled_at < 2.0
    return download


def test_a_cancelled_download_stops_and_the_next_one_resumes_it(tmp_path: Path) -> None:
    file = SlowFile(PAYLOAD, chunk_bytes=4096, interval_s=0.02)
    with serve_slowly(file) as url:
        download = _cancel_after_some_bytes(file, url, tmp_path)
        assert isinstance(download.error, DownloadCancelled), download.error
        assert isinstance(download.error, ModelSourceError)  # an issue like any other
        assert "cancelled" in download.error.issue["ModelDownloadFailed"]["error"]
        [part] = (tmp_path / "models").glob("*.part")
        kept = part.stat().st_size
        assert 0 < kept < len(PAYLOAD)
        [meta] = (tmp_path / "models").glob("*.meta.json")
        assert json.loads(meta.read_text())["complete"] is False
        file.wait(lambda f: f.sending == 0)  # the server saw the client go

        file.interval_s = 0.0
        path = resolve_model({"Url": {"url": url}}, cache_dir=tmp_path)
    assert path is not None and path.read_bytes() == PAYLOAD
    assert file.ranges == [None, f"bytes={kept}-"]


def test_a_cancel_cuts_a_read_the_server_never_answers(tmp_path: Path) -> None:
    file = SlowFile(PAYLOAD, silent=True)
    with serve_slowly(file) as url:
        cancel = threading.Event()
        download = _Download(url, tmp_path, cancel)
        download.start()
        file.wait(lambda f: f.sending == 1)
        time.sleep(0.2)  # blocked in a read now
        cancelled_at = time.monotonic()
        cancel.set()
        download.join(timeout=5)
        assert not download.is_alive()
        assert time.monotonic() - cancelled_at < 2.0
        assert isinstance(download.error, DownloadCancelled), download.error
        file.wait(lambda f: f.sending == 0)


def test_a_download_cancelled_before_it_starts_sends_no_request(tmp_path: Path) -> None:
    file = SlowFile(PAYLOAD)
    cancel = threading.Event()
    cancel.set()
    with serve_slowly(file) as url, pytest.raises(DownloadCancelled):
        resolve_model({"Url": {"url": url}}, cache_dir=tmp_path, cancel=cancel)
    assert file.ranges == []


def test_a_cancelled_hugging_face_download_stops_and_the_next_one_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, at import
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    source = {
        "HuggingFace": {"repo_id": "paddler-test/slow", "revision": "main", "filename": "m.gguf"}
    }
    file = SlowFile(PAYLOAD, chunk_bytes=4096, interval_s=0.02)
    with serve_slowly(file) as url:
        endpoint = url.split("/models/")[0]
        cancel = threading.Event()
        outcome: list[BaseException | Path | None] = []

        def download() -> None:
            try:
                outcome.append(
                    resolve_model(source, cache_dir=tmp_path, hf_endpoint=endpoint, cancel=cancel)
                )
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=download, daemon=True)
        thread.start()
        file.wait(lambda f: f.sent >= 20_000)
        cancelled_at = time.monotonic()
        cancel.set()
        thread.join(timeout=5)
        assert not thread.is_alive()
        assert time.monotonic() - cancelled_at < 2.0
        assert isinstance(outcome[0], DownloadCancelled), outcome
        file.wait(lambda f: f.sending == 0)

        file.interval_s = 0.0
        path = resolve_model(source, cache_dir=tmp_path, hf_endpoint=endpoint)
    assert path is not None and path.read_bytes() == PAYLOAD
    # huggingface_hub 2.x drops a partial download (a unique temporary file per call)
    assert len(file.ranges) == 2
