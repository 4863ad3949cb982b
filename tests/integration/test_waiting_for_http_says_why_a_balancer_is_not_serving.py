"""``LocalCluster.wait_for_http`` says why a balancer is not serving: a balancer that
exits fails the wait at once, with its exit code and its own words; a wait that runs
out says what ``/health`` last answered. And a balancer whose broker was frozen while
its HTTP worker started serves as soon as the broker is back."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from paddler.testing.cluster import free_port, wait_until

UP_WITHIN_S = 10.0


def _accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def test_a_balancer_that_exits_fails_the_wait_at_once_with_its_own_words(make_cluster) -> None:
    shared = f"127.0.0.1:{free_port()}"
    cluster = make_cluster(management_addr=shared, compat_openai_addr=shared)
    cluster.start_balancer()
    started = time.monotonic()
    with pytest.raises(RuntimeError) as failed:
        cluster.wait_for_http(timeout_s=60)
    assert time.monotonic() - started < 30  # not the whole timeout
    message = str(failed.value)
    assert "the balancer exited with code" in message, message
    assert f"port {shared.rpartition(':')[2]} is already used" in message, message


def test_a_wait_that_runs_out_says_what_health_last_answered(make_cluster) -> None:
    cluster = make_cluster()
    balancer = cluster.start_balancer()
    # gunicorn listens: the broker has bound its sockets; freeze it before it answers
    wait_until(lambda: _accepts(cluster.balancer_options["inference_addr"]), 20, 0.02)
    balancer.signal(signal.SIGSTOP)
    try:
        with pytest.raises(TimeoutError) as ran_out:
            cluster.wait_for_http(timeout_s=8)
        message = str(ran_out.value)
        assert "it last answered: 503" in message, message
        assert "the balancer is not answering" in message, message
        assert cluster.clients_addr in message, message
    finally:
        balancer.signal(signal.SIGCONT)
    started = time.monotonic()
    cluster.wait_for_http(timeout_s=UP_WITHIN_S)
    print(f"/health was 200 {time.monotonic() - started:.2f} s after the broker came back")
