"""``paddler cluster`` with ``--inference-api-key @FILE``, a management key from the
environment and ``--tls-cert``/``--tls-key``: its balancer gets the keys in its
environment (never on a command line), serves HTTPS, and asks for the keys."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import trustme

from paddler.testing.cluster import free_port, wait_until
from paddler.testing.processes import live_processes

INFERENCE_KEY = "cluster-inference-key_9a8b7c"
MANAGEMENT_KEY = "cluster-management-key_1d2e3f"


def test_paddler_cluster_serves_https_and_asks_for_its_keys(tmp_path: Path) -> None:
    inference, management = (f"127.0.0.1:{free_port()}" for _ in range(2))
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    keys_file = tmp_path / "inference.keys"
    keys_file.write_text(f"{INFERENCE_KEY}\n")
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    env = dict(
        os.environ,
        PADDLER_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONUNBUFFERED="1",
        PADDLER_MANAGEMENT_API_KEY=MANAGEMENT_KEY,
    )
    log_path = tmp_path / "cluster.log"
    log = open(log_path, "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "paddler",
            "cluster",
            "--agents",
            "1",
            "--slots",
            "1",
            "--agents-addr",
            f"tcp://127.0.0.1:{free_port()}",
            "--clients-addr",
            f"tcp://127.0.0.1:{free_port()}",
            "--inference-addr",
            inference,
            "--management-addr",
            management,
            "--web-admin-panel-addr",
            "off",
            "--http-workers",
            "1",
            "--inference-api-key",
            f"@{keys_file}",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        with httpx.Client(verify=trusted, timeout=10) as http:

            def ready() -> bool:
                try:
                    answer = http.get(
                        f"https://{management}/api/v1/agents",
                        headers={"Authorization": f"Bearer {MANAGEMENT_KEY}"},
                    )
                    agents = answer.json()["agents"]
                except (httpx.HTTPError, KeyError, ValueError):
                    return False
                return len(agents) == 1 and agents[0]["state_application_status"] == "Applied"

            wait_until(ready, timeout_s=60, interval_s=0.2, what="an agent with the demo model")
            url = f"https://{inference}/api/v1/continue_from_conversation_history"
            body = {"conversation_history": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
            assert http.post(url, json=body).status_code == 401
            assert http.get(f"https://{management}/api/v1/agents").status_code == 401
            served = http.post(url, json=body, headers={"Authorization": f"Bearer {INFERENCE_KEY}"})
            last = json.loads(served.text.splitlines()[-1])
            usage = last["Response"]["response"]["GeneratedToken"]["Done"]["usage"]
            assert usage["content_tokens"] == 3
        for found in live_processes():
            assert INFERENCE_KEY.encode() not in found.cmdline
            assert MANAGEMENT_KEY.encode() not in found.cmdline
        output = log_path.read_text()
        assert f"inference   https://{inference}" in output
        assert f'curl -N -H "Authorization: Bearer $KEY" https://{inference}/' in output
        assert INFERENCE_KEY not in output and MANAGEMENT_KEY not in output
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
