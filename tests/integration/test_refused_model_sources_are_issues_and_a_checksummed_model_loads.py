"""A real agent under the operator's model-source rules: what they refuse shows up as an
issue in the agents list (and nothing is loaded); what they allow loads and serves."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from paddler.agent.download import cache_file_name
from paddler.testing.cluster import wait_until
from paddler.testing.tiny_model import write_tiny_llama


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A tiny model on a local HTTP server: ``(port, sha256)``."""
    folder = tmp_path / "served"
    folder.mkdir()
    write_tiny_llama(folder / "served.gguf", seed=7)
    digest = hashlib.sha256((folder / "served.gguf").read_bytes()).hexdigest()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], digest
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_refused_sources_are_issues_and_allowed_ones_load(
    make_cluster: Any, served: tuple[int, str], tmp_path: Path
) -> None:
    port, digest = served
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_llama(models / "local.gguf", seed=3)
    outside = tmp_path / "outside.gguf"
    write_tiny_llama(outside, seed=4)
    (models / "escape.gguf").symlink_to(outside)

    cluster = make_cluster()
    cluster.env["PADDLER_CACHE_DIR"] = str(tmp_path / "cache")
    cluster.start_balancer()
    # localhost is listed by name; 127.0.0.1 (the same server) is not
    cluster.start_real_agent(
        "guarded", slots=1, model_dir=str(models), allow_model_host="localhost"
    )
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    def issue_after(model: Any, kind: str, about: str) -> dict[str, Any]:
        """The ``kind`` issue whose ``model_path`` or ``url`` is ``about``."""
        client.put_desired_state({"model": model, "inference_parameters": {"context_size": 256}})

        def reported() -> dict[str, Any] | None:
            [agent] = client.agents()
            details = (agent["issues"] or [{}])[0].get(kind) or {}
            return agent if about in (details.get("model_path"), details.get("url")) else None

        agent: dict[str, Any] = wait_until(reported, timeout_s=20, what=f"{kind} reported")
        assert not agent["ready"]
        assert agent["model_path"] is None or "outside" not in agent["model_path"]
        details: dict[str, Any] = agent["issues"][0][kind]
        return details

    def loads(model: Any, path: str) -> None:
        """``model`` loads as the file ``path`` (whose name says which model it is) and serves."""
        client.put_desired_state({"model": model, "inference_parameters": {"context_size": 256}})
        agent: dict[str, Any] = wait_until(
            lambda: (
                (a := client.agents()) and a[0]["ready"] and a[0]["model_path"] == path and a[0]
            ),
            timeout_s=20,
            what=f"{path} loaded",
        )
        assert agent["issues"] == []
        assert client.continue_from_raw_prompt("hello", max_tokens=2).text()

    for path in (outside, models / "escape.gguf"):
        refused = issue_after({"LocalToAgent": str(path)}, "ModelPathNotAllowed", str(path))
        assert refused == {"model_path": str(path)}

    url = f"http://127.0.0.1:{port}/served.gguf"
    refused = issue_after({"Url": {"url": url}}, "ModelHostNotAllowed", url)
    assert refused["host"] == "127.0.0.1" and "loopback" in refused["error"]

    listed = f"http://localhost:{port}/served.gguf"
    wrong = {"Url": {"url": listed, "sha256": "f" * 64}}
    mismatch = issue_after(wrong, "ModelChecksumMismatch", listed)
    assert mismatch == {"model_path": listed, "expected": "f" * 64, "actual": digest}

    cached = tmp_path / "cache" / "models" / cache_file_name(listed)
    assert not cached.exists()  # the file with the wrong digest was not kept
    loads({"Url": {"url": listed, "sha256": digest}}, str(cached))
    loads({"LocalToAgent": str(models / "local.gguf")}, str((models / "local.gguf").resolve()))
    assert cluster.agents["guarded"].alive()
