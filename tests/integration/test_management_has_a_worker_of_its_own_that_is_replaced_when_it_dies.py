"""``--http-workers 3``: one gunicorn worker listens only on the management address,
two only on the inference and OpenAI addresses; over TLS, with API keys, each service
answers; a management worker killed with SIGKILL is replaced by another management
worker, and a killed inference worker by an inference worker."""

from __future__ import annotations

import os
import signal
import ssl
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trustme

from paddler.testing.cluster import LocalCluster, free_port, wait_until
from paddler.testing.processes import descends_from, live_processes

INFERENCE_KEY = "split-inference-key_9c41"
MANAGEMENT_KEY = "split-management-key_2f07"
ADDRESSES = ("inference_addr", "management_addr", "compat_openai_addr")


def listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on ``port`` on 127.0.0.1 (``/proc/net/tcp``)."""
    found = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                found.add(inode)
    return found


def sockets_of(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def workers_by_address(cluster: LocalCluster) -> dict[int, frozenset[str]]:
    """gunicorn worker pid -> the addresses it listens on."""
    assert cluster.balancer is not None
    balancer = cluster.balancer.pid
    workers = [
        p.pid
        for p in live_processes()
        if b"gunicorn" in p.cmdline and p.parent != balancer and descends_from(p.parent, balancer)
    ]
    listeners = {
        name: listening_inodes(int(cluster.balancer_options[name].rsplit(":", 1)[1]))
        for name in ADDRESSES
    }
    out = {}
    for pid in workers:
        try:
            held = sockets_of(pid)
        except OSError:
            continue
        out[pid] = frozenset(name for name, inodes in listeners.items() if inodes & held)
    return out


def split_as_expected(cluster: LocalCluster) -> dict[int, frozenset[str]] | None:
    workers = workers_by_address(cluster)
    roles = sorted(sorted(addresses) for addresses in workers.values())
    expected = [["compat_openai_addr", "inference_addr"]] * 2 + [["management_addr"]]
    return workers if roles == expected else None


def replaced(cluster: LocalCluster, dead: int) -> dict[int, frozenset[str]] | None:
    """The workers, once split as expected again without ``dead``."""
    workers = split_as_expected(cluster)
    return workers if workers and dead not in workers else None


def management_worker(workers: dict[int, frozenset[str]]) -> int:
    (pid,) = (pid for pid, addresses in workers.items() if "management_addr" in addresses)
    return pid


def _healthy(url: str, context: ssl.SSLContext) -> bool:
    try:
        return httpx.get(f"{url}/health", verify=context, timeout=1).text == "OK"
    except httpx.HTTPError:
        return False


def test_management_has_a_worker_of_its_own_that_is_replaced_when_it_dies(
    make_cluster: Any, tmp_path: Path
) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    cluster: LocalCluster = make_cluster(
        compat_openai_addr=f"127.0.0.1:{free_port()}",
        http_workers=3,
        tls_cert=str(cert),
        tls_key=str(key),
        inference_api_key=INFERENCE_KEY,
        management_api_key=MANAGEMENT_KEY,
    )
    cluster.start_balancer()
    cluster.start_agent("fake", slots=2, step_ms=2)
    cluster.wait_for_agents(cluster.client(), 1)
    urls = {name: f"https://{cluster.balancer_options[name]}" for name in ADDRESSES}

    def every_service_answers() -> None:
        for url in urls.values():
            wait_until(partial(_healthy, url, trusted), 20, 0.05, f"{url}/health")
        with httpx.Client(verify=trusted, timeout=10) as http:
            management = {"Authorization": f"Bearer {MANAGEMENT_KEY}"}
            inference = {"Authorization": f"Bearer {INFERENCE_KEY}"}
            agents_url = f"{urls['management_addr']}/api/v1/agents"
            assert http.get(agents_url).status_code == 401
            agents = http.get(agents_url, headers=management).json()["agents"]
            assert [agent["name"] for agent in agents] == ["fake"]
            assert http.get(f"{urls['management_addr']}/metrics", headers=management).is_success
            prompt_url = f"{urls['inference_addr']}/api/v1/continue_from_raw_prompt"
            body = {"raw_prompt": "Hi", "max_tokens": 3}
            assert http.post(prompt_url, json=body).status_code == 401
            served = http.post(prompt_url, json=body, headers=inference)
            assert served.status_code == 200 and '"Done"' in served.text
            models = http.get(f"{urls['compat_openai_addr']}/v1/models", headers=inference)
            assert models.status_code == 200
            # each service only on its own address, whichever worker takes the connection
            assert http.get(f"{urls['inference_addr']}/api/v1/agents").status_code == 404

    workers = wait_until(
        partial(split_as_expected, cluster), timeout_s=20, what="one management worker, two others"
    )
    every_service_answers()

    old_management = management_worker(workers)
    os.kill(old_management, signal.SIGKILL)
    after = wait_until(
        partial(replaced, cluster, old_management), timeout_s=20, what="a new management worker"
    )
    others = {pid for pid in workers if pid != old_management}
    assert others < set(after)  # the inference workers went on
    every_service_answers()

    inference_worker = min(others)
    os.kill(inference_worker, signal.SIGKILL)
    again = wait_until(
        partial(replaced, cluster, inference_worker), timeout_s=20, what="a new inference worker"
    )
    assert management_worker(again) == management_worker(after)
    every_service_answers()
