"""An inference flood must not starve the management service.

The inference address gets far more than it can serve (2,000 connections that post
streaming requests back to back, against 40 slots and a buffer of 30): requests
stream, wait in the buffer or get 503 and come straight back. Meanwhile
``/api/v1/agents`` and ``/metrics`` are asked for again and again on the management
address, each on a new connection, as a monitoring system would.

Measured on two shared cores with ``--http-workers 2``: with one pool of workers
serving every service (the balancer before management had a worker of its own), the
probes waited behind the flood, median 0.33 s and p99 1.8 s, 11 answers in 8 s, and
this test failed; with a worker for management, median 6 ms, p99 under 60 ms, about
115 answers.
"""

from __future__ import annotations

import asyncio
import json
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from paddler.testing.cluster import LocalCluster, wait_until

FLOOD_CONNECTIONS = 2000
PROBING_S = 8.0
PROBE_TIMEOUT_S = 5.0


@dataclass
class Flood:
    """Clients that post to the inference address back to back until stopped."""

    address: str
    connections: int
    outcomes: dict[str, int] = field(default_factory=dict)
    """``done`` (streamed to the end), ``overflow`` (503: the buffer was full), ``other``."""
    refused: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._client()) for _ in range(self.connections)]
        while not self.stop.is_set():
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self) -> None:
        host, port = self.address.rsplit(":", 1)
        body = json.dumps({"raw_prompt": "flood " * 50, "max_tokens": 100}).encode()
        request = (
            b"POST /api/v1/continue_from_raw_prompt HTTP/1.1\r\nHost: paddler\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                self.refused += 1
                await asyncio.sleep(0.05)
                continue
            try:
                writer.write(request)
                last = b""
                while chunk := await reader.read(65536):  # scanned, not parsed: a cheap flood
                    last = (last + chunk)[-1024:]
                outcome = (
                    "overflow"
                    if b"Buffered requests overflow" in last
                    else "done"
                    if b'"Done"' in last
                    else "other"
                )
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            except OSError:
                self.refused += 1
            finally:
                writer.close()


def flood_connections() -> int:
    """``FLOOD_CONNECTIONS``, or what the file descriptor limit allows (raised to its
    hard limit first; the balancer inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = FLOOD_CONNECTIONS + 500 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
        soft = max(soft, wanted)
    return min(FLOOD_CONNECTIONS, soft - 500)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def test_management_answers_within_a_second_while_inference_is_flooded(make_cluster: Any) -> None:
    connections = flood_connections()
    cluster: LocalCluster = make_cluster(http_workers=2)
    cluster.start_balancer()
    cluster.wait_for_http()
    for name in ("a1", "a2"):
        cluster.start_agent(name, slots=20, step_ms=5)
    cluster.wait_for_agents(cluster.client(), 2)

    flood = Flood(cluster.balancer_options["inference_addr"], connections)
    flooding = threading.Thread(target=flood.run, name="flood")
    flooding.start()
    latencies_s: dict[str, list[float]] = {"/api/v1/agents": [], "/metrics": []}
    try:
        wait_until(
            lambda: flood.outcomes.get("overflow", 0) >= 100,
            timeout_s=30,
            what="the flood streaming and overflowing the buffer",
        )
        probing_until = time.monotonic() + PROBING_S
        with httpx.Client(timeout=PROBE_TIMEOUT_S) as http:
            while time.monotonic() < probing_until:
                for path, latencies in latencies_s.items():
                    started = time.monotonic()
                    try:
                        response = http.get(
                            f"{cluster.management_url}{path}", headers={"Connection": "close"}
                        )
                        response.raise_for_status()
                        latencies.append(time.monotonic() - started)
                    except httpx.TimeoutException:
                        latencies.append(PROBE_TIMEOUT_S)
                time.sleep(0.05)
        still_flooded = dict(flood.outcomes)
    finally:
        flood.stop.set()
        flooding.join(30)
    assert not flooding.is_alive()

    assert still_flooded.get("overflow", 0) >= 1000, still_flooded  # far more than it can serve
    for path, latencies in latencies_s.items():
        summary = (
            f"{path}: {len(latencies)} answers, median {percentile(latencies, 0.5) * 1000:.0f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms, flood {still_flooded}"
        )
        assert len(latencies) >= 20, summary
        assert percentile(latencies, 0.5) < 0.1, summary
        assert percentile(latencies, 0.99) < 1.0, summary
