"""What the browser tests share: the cluster they drive, its keys, logging in."""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trustme

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
