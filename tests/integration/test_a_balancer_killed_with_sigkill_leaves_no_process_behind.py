from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from paddler.testing.cluster import free_port, wait_until
from paddler.testing.processes import descends_from, live_processes, processes_with


def descendants(ancestor: int) -> set[int]:
    return {p.pid for p in live_processes() if p.pid != ancestor and descends_from(p.pid, ancestor)}


def alive(pids: set[int]) -> set[int]:
    return pids & {p.pid for p in live_processes()}


def kill_leftovers(pids: set[int]) -> None:
    """A failed test leaves nothing running either."""
    for pid in alive(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_balancer_killed_with_sigkill_takes_gunicorn_along_and_restarts_at_once(
    make_cluster: Any,
) -> None:
    cluster = make_cluster(compat_openai_addr=f"127.0.0.1:{free_port()}", http_workers=2)
    first = cluster.start_balancer()
    cluster.wait_for_http()

    def gunicorn_and_two_workers() -> set[int] | None:
        found = descendants(first.pid)
        return found if len(found) == 3 else None

    family = wait_until(gunicorn_and_two_workers, what="gunicorn and two workers")
    try:
        first.signal(signal.SIGKILL)
        first.stop()
        wait_until(
            lambda: not alive(family),
            timeout_s=5,
            interval_s=0.05,
            what="no process of the killed balancer left",
        )
        assert processes_with(cluster.balancer_options["inference_addr"]) == []

        again = cluster.start_balancer("balancer-again")
        cluster.wait_for_http(timeout_s=15)
        assert again.alive()
        assert "Address already in use" not in again.log()
    finally:
        kill_leftovers(family)
