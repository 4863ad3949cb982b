"""An agent downloads its model off the engine thread: the agents list follows the
download's progress, and a new desired state with a local model is applied at once,
the download cancelled (its thread ends, the server sees the client go).

In one process: a real broker, a real agent service with the llama.cpp engine, a real
client, and a local HTTP server that sends the model slowly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paddler.agent.llama.loading import resolve_local
from paddler.agent.llama_engine import LlamaEngine
from paddler.agent.service import AgentService
from paddler.agent.settings import AgentSettings
from paddler.broker.server import BrokerServer
from paddler.broker.settings import BrokerSettings
from paddler.client import Client, Done, Failed, Tokens
from paddler.testing.cluster import free_port, wait_until
from tests.engine.conftest import state_for
from tests.unit.slow_file_server import SlowFile, serve_slowly


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    monkeypatch.setenv("PADDLER_CACHE_DIR", str(tmp_path / "cache"))
    agents_addr = f"tcp://127.0.0.1:{free_port()}"
    clients_addr = f"tcp://127.0.0.1:{free_port()}"
    servers: list[BrokerServer] = []

    def run_broker() -> None:  # built here: its SQLite store belongs to this thread
        servers.append(
            BrokerServer(BrokerSettings(agents_addr=agents_addr, clients_addr=clients_addr))
        )
        servers[0].run()

    broker_thread = threading.Thread(target=run_broker, name="broker", daemon=True)
    broker_thread.start()
    wait_until(lambda: servers, timeout_s=10, what="the broker bound")
    engine = LlamaEngine(1, n_threads=1, resolver=resolve_local)
    service = AgentService(
        AgentSettings(broker_addr=agents_addr, slots=1, name="downloader"), engine
    )
    agent_thread = threading.Thread(target=service.run, name="agent", daemon=True)
    agent_thread.start()
    client = Client(clients_addr, timeout_s=10)
    try:
        wait_until(lambda: len(client.agents()) == 1, timeout_s=10, what="the agent registered")
        yield client
    finally:
        client.close()
        service.stop()
        agent_thread.join(timeout=15)
        servers[0].stop()
        broker_thread.join(timeout=15)
        assert not agent_thread.is_alive() and not broker_thread.is_alive()
    assert service.exit_code == 0


def _agent(client: Client) -> dict[str, Any]:
    [agent] = client.agents()
    return agent


def test_the_agents_list_follows_the_download_and_a_local_model_replaces_it_at_once(
    client: Client, tiny_model: Path
) -> None:
    # ~420 kB at 20 kB/s: about 20 s to download
    file = SlowFile(tiny_model.read_bytes(), chunk_bytes=2048, interval_s=0.1)
    with serve_slowly(file) as url:
        client.put_desired_state(
            {"model": {"Url": {"url": url}}, "inference_parameters": {"context_size": 256}}
        )
        first = wait_until(
            lambda: (a := _agent(client))["download_current"] > 0 and a,
            timeout_s=10,
            what="download progress in the agents list",
        )
        assert not first["ready"] and first["download_total"] == len(file.payload)
        later = wait_until(
            lambda: (a := _agent(client))["download_current"] > first["download_current"] and a,
            timeout_s=10,
            what="more download progress",
        )
        assert later["download_current"] < len(file.payload)

        started = time.monotonic()
        client.put_desired_state(state_for(tiny_model))
        agent = wait_until(
            lambda: (a := _agent(client))["ready"] and a, timeout_s=10, what="the local model"
        )
        assert time.monotonic() - started < 5.0, "the new state waited for the download"
        assert agent["model_path"] == str(tiny_model) and agent["issues"] == []
        assert file.sent < len(file.payload)
        wait_until(
            lambda: not any(t.name == "paddler-model-download" for t in threading.enumerate()),
            timeout_s=5,
            what="the download thread ended",
        )
        file.wait(lambda f: f.sending == 0, timeout_s=5)

    text = ""
    end: Any = None
    for event in client.continue_from_raw_prompt("hello", max_tokens=4):
        if isinstance(event, Tokens):
            text += "".join(event.pieces)
        elif isinstance(event, Done | Failed):
            end = event
    assert isinstance(end, Done) and text
