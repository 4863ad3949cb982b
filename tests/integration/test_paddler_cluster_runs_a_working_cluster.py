from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from paddler.client import Client
from paddler.errors import BrokerUnreachable
from paddler.testing.cluster import free_port, wait_until
from paddler.testing.processes import processes_with


def test_paddler_cluster_serves_the_demo_model_and_stops_cleanly(tmp_path) -> None:
    inference, management, openai, panel = (f"127.0.0.1:{free_port()}" for _ in range(4))
    agents_addr = f"tcp://127.0.0.1:{free_port()}"
    clients_addr = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, PADDLER_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    log = open(tmp_path / "cluster.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "paddler",
            "cluster",
            "--agents",
            "2",
            "--slots",
            "2",
            "--agents-addr",
            agents_addr,
            "--clients-addr",
            clients_addr,
            "--inference-addr",
            inference,
            "--management-addr",
            management,
            "--compat-openai-addr",
            openai,
            "--web-admin-panel-addr",
            panel,
            "--http-workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:

        def ready() -> bool:
            try:
                agents = httpx.get(f"http://{management}/api/v1/agents").json()["agents"]
            except httpx.HTTPError:
                return False
            return len(agents) == 2 and all(
                a["state_application_status"] == "Applied" and a["model_path"] for a in agents
            )

        wait_until(ready, timeout_s=60, interval_s=0.2, what="two agents with the demo model")
        # curve is on with fresh keys: each agent shows its own key, and a client
        # without one cannot reach the broker
        agents = httpx.get(f"http://{management}/api/v1/agents").json()["agents"]
        fingerprints = {agent["key_fingerprint"] for agent in agents}
        assert len(fingerprints) == 2 and None not in fingerprints
        with pytest.raises(BrokerUnreachable):
            Client(clients_addr, timeout_s=1.5)
        response = httpx.post(
            f"http://{inference}/api/v1/continue_from_conversation_history",
            json={"conversation_history": [{"role": "user", "content": "Hello!"}], "max_tokens": 8},
        )
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert (
            lines[-1]["Response"]["response"]["GeneratedToken"]["Done"]["usage"]["content_tokens"]
            == 8
        )
        models = httpx.get(f"http://{openai}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny-llama-v1.gguf"]
        output = (tmp_path / "cluster.log").read_text()
        assert "tiny built-in demo model" in output
        assert f"curl -N http://{inference}/api/v1/continue_from_conversation_history" in output
        assert f"admin panel http://{panel}/" in output
        page = httpx.get(f"http://{panel}/")
        assert page.status_code == 200 and "paddler" in page.text

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert time.monotonic() - started < 5
        # the balancer and the agents carry the agents address in argv, gunicorn its bind
        wait_until(
            lambda: not (processes_with(agents_addr) or processes_with(inference)),
            timeout_s=3,
            what="no cluster process left",
        )
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_paddler_cluster_refuses_keys_of_its_own(tmp_path) -> None:
    """It makes fresh keys for its balancer and agents: an operator's key would leave
    its agents outside, so it says to run balancer and agent instead."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "paddler",
            "cluster",
            "--curve-secret-key",
            str(tmp_path / "mine.key_secret"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--curve-secret-key" in result.stderr
    assert "paddler balancer and paddler agent" in result.stderr
