"""A model download runs off the engine thread: the engine answers meanwhile (requests
end with ``AgentUnavailable``), its status carries the progress, a new desired state
cancels the download and is applied at once, and the download resumes when the URL is
wanted again; the engine loads the file once it is there."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from paddler.agent.llama.loading import resolve_local
from paddler.agent.llama_engine import LlamaEngine
from paddler.protocol.requests import validate_request
from tests.engine.conftest import RecordingSink, run, state_for
from tests.unit.slow_file_server import SlowFile, serve_slowly


def _url_state(url: str) -> dict[str, Any]:
    return {"model": {"Url": {"url": url}}, "inference_parameters": {"context_size": 256}}


def _download_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "paddler-model-download"]


def _until(engine: LlamaEngine, condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Tick the engine as the worker does when idle, until ``condition`` holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, engine.status()
        engine.take_status_change()
        time.sleep(0.02)


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PADDLER_CACHE_DIR", str(tmp_path / "cache"))
    engine = LlamaEngine(1, n_threads=1, resolver=resolve_local)
    yield engine
    engine.close()


def test_a_local_model_is_loaded_at_once_while_a_slow_download_runs_and_the_download_stops(
    engine: LlamaEngine, tiny_model: Path, tmp_path: Path
) -> None:
    # ~420 kB at 20 kB/s: the download would take about 20 s
    file = SlowFile(tiny_model.read_bytes(), chunk_bytes=2048, interval_s=0.1)
    with serve_slowly(file) as url:
        started = time.monotonic()
        engine.apply_state(_url_state(url))
        assert time.monotonic() - started < 1.0, "apply_state waited for the download"
        status = engine.status()
        assert not status.ready and status.state_application_status == "Fresh"

        _until(engine, lambda: engine.status().download_current > 0)
        deadline = time.monotonic() + 5
        while not engine.take_status_change():  # progress reaches the worker
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert "slow" in engine.status().download_filename
        assert engine.status().download_total == len(file.payload)

        # no model meanwhile: a request ends at once, the engine is not blocked
        sink = RecordingSink(engine)
        engine.admit(1, validate_request({"raw_prompt": "hello", "max_tokens": 2}))
        engine.step(sink)
        assert sink.ends()[1][1][1] == "AgentUnavailable"

        started = time.monotonic()
        engine.apply_state(state_for(tiny_model))
        assert time.monotonic() - started < 5.0
        status = engine.status()
        assert status.ready and status.model_path == str(tiny_model), status
        assert file.sent < len(file.payload)

        # the download thread stops, the server sees the client go
        deadline = time.monotonic() + 5
        while _download_threads():
            assert time.monotonic() < deadline, "the download thread is still running"
            time.sleep(0.02)
        file.wait(lambda f: f.sending == 0, timeout_s=5)
        sent = file.sent
        time.sleep(0.3)
        assert file.sent == sent
        engine.take_status_change()
        status = engine.status()
        assert status.ready and status.state_application_status == "Applied"
        assert run(engine, {2: {"raw_prompt": "hello", "max_tokens": 3}}).ends()[2][0] == "done"

        # wanted again: the download resumes where it stopped, and the model loads
        [part] = (tmp_path / "cache" / "models").glob("*.part")
        kept = part.stat().st_size
        assert kept > 0
        file.interval_s = 0.0
        engine.apply_state(_url_state(url))
        assert not engine.status().ready
        _until(engine, lambda: engine.status().ready)
    status = engine.status()
    assert status.model_path is not None and "slow" in status.model_path
    assert Path(status.model_path).read_bytes() == tiny_model.read_bytes()
    assert status.download_current == status.download_total == len(file.payload)
    assert file.ranges[-1] == f"bytes={kept}-"
    assert run(engine, {3: {"raw_prompt": "hello", "max_tokens": 3}}).ends()[3][0] == "done"


def test_a_failed_download_is_an_issue_and_the_engine_goes_on(
    engine: LlamaEngine, tiny_model: Path
) -> None:
    engine.apply_state(_url_state("http://127.0.0.1:9/nothing-listens-here.gguf"))
    _until(engine, lambda: bool(engine.status().issues))
    status = engine.status()
    assert "ModelDownloadFailed" in status.issues[0]
    assert status.state_application_status == "AttemptedAndNotAppliable"
    engine.apply_state(state_for(tiny_model))
    assert engine.status().ready and engine.status().issues == []


def test_closing_the_engine_stops_its_download(
    tiny_model: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("PADDLER_CACHE_DIR", str(tmp_path / "cache"))
    file = SlowFile(tiny_model.read_bytes(), chunk_bytes=1024, interval_s=0.1)
    with serve_slowly(file) as url:
        engine = LlamaEngine(1, n_threads=1, resolver=resolve_local)
        engine.apply_state(_url_state(url))
        file.wait(lambda f: f.sent > 0)
        engine.close()
        assert not _download_threads()
        file.wait(lambda f: f.sending == 0, timeout_s=5)
