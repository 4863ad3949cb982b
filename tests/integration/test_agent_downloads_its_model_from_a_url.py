from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from paddler.testing.cluster import wait_until
from paddler.testing.tiny_model import write_tiny_llama


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def model_server(tmp_path: Path) -> Iterator[str]:
    folder = tmp_path / "served"
    folder.mkdir()
    write_tiny_llama(folder / "served.gguf", seed=5)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_an_agent_downloads_a_url_model_reports_progress_and_serves(
    make_cluster, model_server, tmp_path
) -> None:
    cluster = make_cluster()
    cluster.env["PADDLER_CACHE_DIR"] = str(tmp_path / "cache")
    cluster.start_balancer()
    cluster.start_real_agent("downloader", slots=1)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    client.put_desired_state(
        {
            "model": {"Url": {"url": f"{model_server}/served.gguf"}},
            "inference_parameters": {"context_size": 256},
        }
    )
    agent = wait_until(
        lambda: (a := client.agents()) and a[0]["ready"] and a[0],
        timeout_s=20,
        what="model downloaded and loaded",
    )
    size = (Path(cluster.env["PADDLER_CACHE_DIR"]) / "models").glob("served-*.gguf")
    [downloaded] = list(size)
    assert agent["model_path"] == str(downloaded)
    assert agent["download_filename"] and "served" in agent["download_filename"]
    assert agent["download_current"] == agent["download_total"] == downloaded.stat().st_size
    assert agent["issues"] == []
    assert client.continue_from_raw_prompt("hello", max_tokens=3).text()

    client.put_desired_state({"model": {"Url": {"url": f"{model_server}/missing.gguf"}}})
    agent = wait_until(
        lambda: (a := client.agents()) and a[0]["issues"] and a[0],
        timeout_s=20,
        what="download issue reported",
    )
    assert "ModelDownloadFailed" in agent["issues"][0]
    assert "404" in agent["issues"][0]["ModelDownloadFailed"]["error"]
    assert not agent["ready"]
