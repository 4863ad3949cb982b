from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from paddler.cluster import HEALTHY_AFTER_S, Child
from paddler.testing.cluster import free_port, wait_until
from paddler.testing.processes import descends_from, live_processes, processes_with


def start_cluster(tmp_path: Path, agents: int) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """``paddler cluster`` on free ports, its output in ``tmp_path/cluster.log``."""
    addresses = {
        "agents": f"tcp://127.0.0.1:{free_port()}",
        "clients": f"tcp://127.0.0.1:{free_port()}",
        "inference": f"127.0.0.1:{free_port()}",
        "management": f"127.0.0.1:{free_port()}",
        "web-admin-panel": f"127.0.0.1:{free_port()}",
    }
    env = dict(os.environ, PADDLER_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    with open(tmp_path / "cluster.log", "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "paddler",
                "cluster",
                "--agents",
                str(agents),
                "--slots",
                "1",
                "--agent-threads",
                "1",
                *(
                    arg
                    for name, address in addresses.items()
                    for arg in (f"--{name}-addr", address)
                ),
                "--http-workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return process, addresses


def ready_agents(management: str) -> list[dict[str, Any]]:
    try:
        agents = httpx.get(f"http://{management}/api/v1/agents", timeout=2).json()["agents"]
    except httpx.HTTPError:
        return []
    return [a for a in agents if a["state_application_status"] == "Applied" and a["model_path"]]


def agent_processes(cluster: int) -> dict[int, bytes]:
    """The cluster's agents: pid -> command line."""
    return {
        p.pid: p.cmdline
        for p in live_processes()
        if p.parent == cluster and b"\0agent\0" in p.cmdline
    }


def descendants(ancestor: int) -> set[int]:
    return {p.pid for p in live_processes() if p.pid != ancestor and descends_from(p.pid, ancestor)}


def alive(pids: set[int]) -> set[int]:
    return pids & {p.pid for p in live_processes()}


def kill_leftovers(pids: set[int]) -> None:
    """A failed test leaves nothing running either."""
    for pid in alive(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_agent_is_restarted_and_the_cluster_stops_cleanly(tmp_path: Path) -> None:
    process, addresses = start_cluster(tmp_path, agents=2)
    try:
        wait_until(
            lambda: len(ready_agents(addresses["management"])) == 2,
            timeout_s=60,
            interval_s=0.2,
            what="two agents with the demo model",
        )
        agents = agent_processes(process.pid)
        assert len(agents) == 2
        victim, argv = next(iter(agents.items()))
        os.kill(victim, signal.SIGKILL)

        def restarted() -> int | None:
            new = [pid for pid, line in agent_processes(process.pid).items() if line == argv]
            return new[0] if new and new[0] != victim else None

        replacement = wait_until(restarted, timeout_s=10, interval_s=0.1, what="agent restarted")
        # an agent's id carries its pid: the dead one leaves the list, the new one serves

        def served_by_the_replacement() -> bool:
            ids = [a["id"] for a in ready_agents(addresses["management"])]
            return (
                len(ids) == 2
                and any(f"-{replacement}-" in i for i in ids)
                and not any(f"-{victim}-" in i for i in ids)
            )

        wait_until(
            served_by_the_replacement,
            timeout_s=60,
            interval_s=0.2,
            what="two ready agents, one of them the restarted one",
        )
        output = (tmp_path / "cluster.log").read_text()
        assert f"(pid {victim}) stopped after" in output
        assert "(killed by SIGKILL); restarting it in 1 s" in output
        assert f"restarted (pid {replacement}, restart 1)" in output

        family = descendants(process.pid)
        assert len(family) >= 5  # a balancer, gunicorn and its worker, two agents
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        wait_until(lambda: not alive(family), timeout_s=3, what="no cluster process left")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_cluster_killed_with_sigkill_leaves_no_process_behind(tmp_path: Path) -> None:
    process, addresses = start_cluster(tmp_path, agents=1)
    family: set[int] = set()
    try:
        wait_until(
            lambda: len(ready_agents(addresses["management"])) == 1,
            timeout_s=60,
            interval_s=0.2,
            what="an agent with the demo model",
        )
        family = descendants(process.pid)
        assert len(family) >= 4  # a balancer, gunicorn and its worker, an agent
        process.kill()
        process.wait(5)
        wait_until(
            lambda: not alive(family),
            timeout_s=10,
            interval_s=0.1,
            what="no process of the killed cluster left",
        )
        assert processes_with(addresses["agents"]) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        kill_leftovers(family)


def test_a_cluster_whose_balancer_dies_stops_its_agents_and_exits_1(tmp_path: Path) -> None:
    process, addresses = start_cluster(tmp_path, agents=1)
    family: set[int] = set()
    try:
        wait_until(
            lambda: len(ready_agents(addresses["management"])) == 1,
            timeout_s=60,
            interval_s=0.2,
            what="an agent with the demo model",
        )
        family = descendants(process.pid)
        (balancer,) = (
            p.pid
            for p in live_processes()
            if p.parent == process.pid and b"\0balancer\0" in p.cmdline
        )
        os.kill(balancer, signal.SIGKILL)
        assert process.wait(10) == 1
        assert (
            "the balancer stopped (killed by SIGKILL); stopping the agents"
            in (tmp_path / "cluster.log").read_text()
        )
        wait_until(lambda: not alive(family), timeout_s=5, what="no cluster process left")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        kill_leftovers(family)


def test_restarts_back_off_from_1_s_doubling_to_30_s_and_start_over_after_a_long_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "paddler.cluster")
    child = Child("quitter", [sys.executable, "-c", "raise SystemExit(3)"])
    child.start()
    delays = []
    for _ in range(7):
        assert child.popen is not None
        child.popen.wait(10)
        now = time.monotonic()
        child.supervise(now)  # notes the exit
        assert child.restart_at is not None
        delays.append(round(child.restart_at - now))
        child.supervise(now + 0.5)  # too early
        assert child.restarts == len(delays) - 1
        child.supervise(child.restart_at)  # restarts
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert child.restarts == 7
    assert "(exit status 3); restarting it in 1 s" in caplog.text
    assert f"quitter restarted (pid {child.pid}, restart 7)" in caplog.text

    assert child.popen is not None
    child.popen.wait(10)
    child.started_at -= HEALTHY_AFTER_S  # it ran for a while before it stopped
    now = time.monotonic()
    child.supervise(now)
    assert child.restart_at is not None and round(child.restart_at - now) == 1
