"""``GET /health`` of an HTTP worker tells the truth about the broker behind it: 200
``OK`` while it answers, 503 with the reason within a few seconds of the broker being
frozen (SIGSTOP) or killed (SIGKILL), and 200 again once it is back. Real processes:
``paddler balancer``, and gunicorn workers of the same app started on their own (a
balancer's own workers die with it, so the killed case needs workers that outlive it).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import httpx

from paddler.http.app import CONFIG_ENV, HttpConfig
from paddler.testing.cluster import LocalCluster, Process, free_port, wait_until

DOWN_WITHIN_S = 8.0
"""The checks ping at most once a second and give up on a ping after 2 s; 3 s without
hearing the broker is down. With margin for a loaded machine."""
UP_WITHIN_S = 15.0


def _status(url: str) -> tuple[int, str] | None:
    try:
        answer = httpx.get(f"{url}/health", timeout=5)
    except httpx.HTTPError:
        return None
    return answer.status_code, answer.text


def _until(url: str, status: int, within_s: float) -> tuple[tuple[int, str], float]:
    """The first answer with ``status``, and how long it took to come."""
    started = time.monotonic()
    answer = wait_until(
        lambda: (a := _status(url)) is not None and a[0] == status and a,
        within_s,
        0.1,
        f"{url}/health answers {status}",
    )
    return answer, time.monotonic() - started


def _front_end(cluster: LocalCluster, log_dir: Path) -> tuple[Process, str]:
    """gunicorn with the inference app, connected to ``cluster``'s broker, in a process
    of its own (as ``paddler balancer`` starts it, minus the tie to its parent)."""
    port = free_port()
    env = dict(cluster.env)
    env[CONFIG_ENV] = HttpConfig(cluster.clients_addr, {str(port): "inference"}).to_env()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "paddler.http.app:get_app()",
        "--worker-class",
        "asgi",
        "--workers",
        "1",
        "--graceful-timeout",
        "2",
        "--bind",
        f"127.0.0.1:{port}",
        "--log-level",
        "info",
        "--error-logfile",
        "-",
    ]
    return Process("front-end", argv, log_dir, env), f"http://127.0.0.1:{port}"


def test_health_is_503_while_the_broker_is_frozen_or_dead_and_ok_again_after(
    make_cluster, tmp_path: Path
) -> None:
    cluster = make_cluster()
    balancer = cluster.start_balancer("balancer-1")
    front_end, own_url = _front_end(cluster, tmp_path)
    try:
        cluster.wait_for_http()  # /health is 200 on a healthy cluster right after start
        wait_until(lambda: _status(own_url) == (200, "OK"), 20, 0.1, "front end up")
        urls = [cluster.inference_url, own_url]
        # a healthy cluster stays healthy under polling
        for _ in range(20):
            assert all(_status(url) == (200, "OK") for url in urls)
            time.sleep(0.1)

        # frozen: the process lives, holds its sockets, answers nothing
        balancer.signal(signal.SIGSTOP)
        try:
            for url in urls:
                (_, text), took_s = _until(url, 503, DOWN_WITHIN_S)
                print(f"frozen: {url}/health was 503 after {took_s:.1f} s: {text}")
                assert "the balancer is not answering" in text, text
                assert cluster.clients_addr in text, text
        finally:
            balancer.signal(signal.SIGCONT)
        for url in urls:
            _until(url, 200, UP_WITHIN_S)

        # dead: only the workers that outlive it can answer; they say 503
        balancer.signal(signal.SIGKILL)
        balancer.wait(5)
        (_, text), took_s = _until(own_url, 503, DOWN_WITHIN_S)
        print(f"killed: {own_url}/health was 503 after {took_s:.1f} s: {text}")
        assert "the balancer is not answering" in text, text

        # back: a new balancer on the same broker address (its own HTTP ports)
        again = make_cluster()
        again.clients_addr, again.agents_addr = cluster.clients_addr, cluster.agents_addr
        again.start_balancer("balancer-2")
        (_, text), took_s = _until(own_url, 200, UP_WITHIN_S)
        print(f"back: {own_url}/health was 200 after {took_s:.1f} s")
        assert text == "OK"
        again.wait_for_http()
    finally:
        front_end.stop()
