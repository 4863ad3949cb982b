"""What the browser tests share: the cluster they drive, its keys, logging in."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trustme

from paddler.testing.cluster import LocalCluster, wait_until

INFERENCE_KEY = "panel-inference-key_4f3a2b"
MANAGEMENT_KEY = "panel-management-key_9c8d7e"


@dataclass
class PanelCluster:
    """A running ``paddler cluster`` with its addresses and a client for its APIs."""

    process: subprocess.Popen[bytes]
    log_path: Path
    panel: str
    inference: str
    management: str
    http: httpx.Client
    model_copy: Path
    screenshots: Path
    folder: Path
    """The test's own folder (the cluster's TMPDIR is in it)."""
    keys: Path | None = None
    """The private folder of CurveZMQ keys the cluster made (``paddler.cluster.ClusterKeys``)."""
    expected_console_errors: list[str] = field(default_factory=list)

    def agents(self) -> list[dict[str, Any]]:
        answer = self.http.get(
            f"{self.management}/api/v1/agents",
            headers={"Authorization": f"Bearer {MANAGEMENT_KEY}"},
        )
        answer.raise_for_status()
        agents: list[dict[str, Any]] = answer.json()["agents"]
        return agents

    def desired_state(self) -> dict[str, Any]:
        answer = self.http.get(
            f"{self.management}/api/v1/balancer_desired_state",
            headers={"Authorization": f"Bearer {MANAGEMENT_KEY}"},
        )
        answer.raise_for_status()
        state: dict[str, Any] = answer.json()
        return state

    def put_desired_state(self, state: dict[str, Any]) -> None:
        answer = self.http.put(
            f"{self.management}/api/v1/balancer_desired_state",
            json=state,
            headers={"Authorization": f"Bearer {MANAGEMENT_KEY}"},
        )
        answer.raise_for_status()

    def buffered(self) -> int:
        answer = self.http.get(
            f"{self.management}/api/v1/buffered_requests",
            headers={"Authorization": f"Bearer {MANAGEMENT_KEY}"},
        )
        answer.raise_for_status()
        return int(answer.json()["buffered_requests_current"])

    def wait_for_agents(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> None:
        """Until both agents have applied the desired state, have a model, no issue,
        and ``predicate`` holds for each."""

        def reached() -> bool:
            agents = self.agents()
            return len(agents) == 2 and all(
                a["state_application_status"] == "Applied"
                and a["model_path"]
                and not a["issues"]
                and predicate(a)
                for a in agents
            )

        wait_until(reached, timeout_s=60, interval_s=0.1, what=what)

    def wait_until_idle(self) -> None:
        """Until no slot is busy and no request waits in the buffer."""

        def idle() -> bool:
            return self.buffered() == 0 and all(a["slots_processing"] == 0 for a in self.agents())

        wait_until(idle, timeout_s=30, interval_s=0.1, what="every slot free, the buffer empty")

    def generate(self, max_tokens: int) -> str:
        answer = self.http.post(
            f"{self.inference}/api/v1/continue_from_raw_prompt",
            json={"raw_prompt": "Once upon a time", "max_tokens": max_tokens},
            headers={"Authorization": f"Bearer {INFERENCE_KEY}"},
            timeout=60,
        )
        answer.raise_for_status()
        return answer.text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class OpenCluster:
    """A ``paddler balancer`` serving its panel over plain HTTP, no API keys, and one
    real agent (``paddler.testing.cluster.LocalCluster``)."""

    local: LocalCluster
    panel: str
    cache: Path
    """The agent's ``PADDLER_CACHE_DIR``."""

    def agents(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.local.management_url}/api/v1/agents", timeout=10)
        answer.raise_for_status()
        agents: list[dict[str, Any]] = answer.json()["agents"]
        return agents


def stop_process(process: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM a process started in a session of its own; SIGKILL its whole group if it
    has not exited within ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def certificate(folder: Path) -> tuple[Path, Path, ssl.SSLContext]:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    return cert, key, trusted


def login(page: Any, cluster: PanelCluster, path: str = "#/") -> None:
    """Open the panel in ``page`` and give it the keys it asks for."""
    page.goto(f"{cluster.panel}/{path}")
    page.get_by_test_id("keys-form").wait_for()
    page.get_by_test_id("key-management").fill(MANAGEMENT_KEY)
    page.get_by_test_id("key-inference").fill(INFERENCE_KEY)
    page.get_by_role("button", name="Continue").click()
    page.get_by_test_id("keys-form").wait_for(state="detached")
