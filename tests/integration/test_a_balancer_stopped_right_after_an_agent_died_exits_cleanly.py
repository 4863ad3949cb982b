"""The crash of issue 10: an agent dies with requests in flight, the balancer is told
to stop before it noticed; its shutdown ends the requests, its last flush finds the
dead agent unreachable and removes it. That removal used to raise ``KeyError`` (the
shutdown had forgotten the requests but left them in the in-flight table)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from paddler.client import Dispatched, Failed, Tokens
from paddler.testing.cluster import LocalCluster, wait_until


def test_a_balancer_stopped_right_after_an_agent_died_exits_cleanly(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(buffered_request_timeout=30_000)
    balancer = cluster.start_balancer()
    doomed = cluster.start_agent("doomed", slots=1, step_ms=20)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    streamed = client.continue_from_raw_prompt("streams", max_tokens=100_000)
    events = iter(streamed)
    assert isinstance(next(events), Dispatched)
    assert isinstance(next(events), Tokens)
    buffered = client.continue_from_raw_prompt("waits", max_tokens=3)
    wait_until(lambda: client.buffered_requests() == 1, what="one request buffered")

    doomed.signal(signal.SIGKILL)
    doomed.wait(5)
    time.sleep(0.05)  # the broker's connection to it closes; its heartbeat is 1 s away
    balancer.signal(signal.SIGTERM)

    for stream in (events, iter(buffered)):
        last = list(stream)[-1]
        assert isinstance(last, Failed)
        assert (last.code, last.kind) in ((503, "ShuttingDown"), (502, "AgentLost"))
    assert balancer.wait(5) == 0
    assert "Traceback" not in balancer.log()
