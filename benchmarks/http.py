"""HTTP overhead benchmark, fake-engine agents (no model):

- time to first token and inter-token latency through HTTP (NDJSON, WebSocket,
  and SSE on the OpenAI API) versus through the ZMQ client library versus talking
  to an agent directly (this process as a minimal broker);
- the streaming rate of one gunicorn worker to many concurrent NDJSON clients.

Usage: ``python -m benchmarks.http [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

from benchmarks.broker import ttft_direct
from benchmarks.common import machine, summary_ms, write_result
from paddler.client import Client, Tokens
from paddler.testing.cluster import LocalCluster, free_port, wait_until

TARGET_ADDED_MS = 2.0
TARGET_WORKER_TOKENS_PER_S = 50_000


def ttft_zmq(cluster: LocalCluster, samples: int) -> list[float]:
    times = []
    with Client(cluster.clients_addr, timeout_s=30) as client:
        for _ in range(samples):
            started = time.perf_counter()
            first = None
            for event in client.continue_from_raw_prompt("x", max_tokens=1):
                if isinstance(event, Tokens) and first is None:
                    first = time.perf_counter() - started
            times.append(first or 0.0)
    return times


def ttft_ndjson(cluster: LocalCluster, samples: int) -> list[float]:
    times = []
    url = f"{cluster.inference_url}/api/v1/continue_from_raw_prompt"
    with httpx.Client(timeout=30) as http:
        for _ in range(samples):
            started = time.perf_counter()
            first = None
            with http.stream("POST", url, json={"raw_prompt": "x", "max_tokens": 1}) as response:
                for chunk in response.iter_raw():
                    if first is None and b"ContentToken" in chunk:
                        first = time.perf_counter() - started
            times.append(first or 0.0)
    return times


def ttft_websocket(cluster: LocalCluster, samples: int) -> list[float]:
    times = []
    url = cluster.inference_url.replace("http://", "ws://") + "/api/v1/inference_socket"
    with connect(url) as socket:
        for index in range(samples):
            started = time.perf_counter()
            socket.send(
                json.dumps(
                    {
                        "Request": {
                            "id": str(index),
                            "request": {
                                "ContinueFromRawPrompt": {"raw_prompt": "x", "max_tokens": 1}
                            },
                        }
                    }
                )
            )
            first = None
            while True:
                message = socket.recv(timeout=10)
                if first is None and "ContentToken" in message:
                    first = time.perf_counter() - started
                if "Done" in message or "Error" in message:
                    break
            times.append(first or 0.0)
    return times


def ttft_sse(cluster: LocalCluster, samples: int) -> list[float]:
    times = []
    url = f"{cluster.openai_url}/v1/completions"
    with httpx.Client(timeout=30) as http:
        for _ in range(samples):
            started = time.perf_counter()
            first = None
            body = {"model": "m", "prompt": "x", "max_tokens": 1, "stream": True}
            with http.stream("POST", url, json=body) as response:
                for chunk in response.iter_raw():
                    if (
                        first is None
                        and b'"text":"' in chunk.replace(b" ", b"")
                        and (b'"text":""' not in chunk.replace(b" ", b""))
                    ):
                        first = time.perf_counter() - started
            times.append(first or 0.0)
    return times


def itl(cluster: LocalCluster, tokens: int) -> dict[str, dict[str, float]]:
    """Gaps between tokens of one long stream, per channel."""
    out: dict[str, dict[str, float]] = {}
    gaps: list[float] = []
    with Client(cluster.clients_addr, timeout_s=30) as client:
        last = None
        for event in client.continue_from_raw_prompt("x", max_tokens=tokens):
            if isinstance(event, Tokens):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
    out["zmq"] = summary_ms(gaps)
    gaps = []
    url = f"{cluster.inference_url}/api/v1/continue_from_raw_prompt"
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", url, json={"raw_prompt": "x", "max_tokens": tokens}) as response,
    ):
        last = None
        for _line in response.iter_lines():
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
    out["ndjson"] = summary_ms(gaps[:-1])
    gaps = []
    ws_url = cluster.inference_url.replace("http://", "ws://") + "/api/v1/inference_socket"
    with connect(ws_url) as socket:
        socket.send(
            json.dumps(
                {
                    "Request": {
                        "id": "i",
                        "request": {
                            "ContinueFromRawPrompt": {"raw_prompt": "x", "max_tokens": tokens}
                        },
                    }
                }
            )
        )
        last = None
        while True:
            message = socket.recv(timeout=10)
            now = time.perf_counter()
            if "Done" in message:
                break
            if last is not None:
                gaps.append(now - last)
            last = now
    out["websocket"] = summary_ms(gaps)
    return out


async def worker_rate(cluster: LocalCluster, streams: int, tokens: int) -> dict[str, Any]:
    """Tokens/s one gunicorn worker streams to ``streams`` concurrent NDJSON clients."""
    url = f"{cluster.inference_url}/api/v1/continue_from_raw_prompt"
    counted = 0
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def one() -> None:
            nonlocal counted
            body = {"raw_prompt": "x", "max_tokens": tokens}
            async with http.stream("POST", url, json=body) as response:
                async for chunk in response.aiter_raw():
                    counted += chunk.count(b"ContentToken")

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(streams)))
        elapsed = time.perf_counter() - started
    return {
        "streams": streams,
        "tokens": counted,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(counted / elapsed),
    }


def run(quick: bool) -> dict[str, Any]:
    samples = 100 if quick else 500
    with tempfile.TemporaryDirectory(prefix="paddler-bench-") as tmp:
        env = dict(os.environ)
        cluster = LocalCluster(
            Path(tmp) / "latency", http_workers=1, compat_openai_addr=f"127.0.0.1:{free_port()}"
        )
        cluster.env = env
        cluster.start_balancer()
        try:
            cluster.wait_for_http()
            cluster.start_agent("a1", slots=4, step_ms=0)
            with Client(cluster.clients_addr) as client:
                cluster.wait_for_agents(client, 1)
            ttft = {
                "zmq": summary_ms(ttft_zmq(cluster, samples)),
                "ndjson": summary_ms(ttft_ndjson(cluster, samples)),
                "websocket": summary_ms(ttft_websocket(cluster, samples)),
            }
            try:
                ttft["sse_openai"] = summary_ms(ttft_sse(cluster, samples))
            except httpx.HTTPError as exc:  # the OpenAI app is optional
                ttft["sse_openai"] = {"error": str(exc)}
            ttft["direct"] = summary_ms(ttft_direct(env, samples, Path(tmp)))
            for name in list(cluster.agents):
                cluster.agents.pop(name).stop()
            cluster.start_agent("paced", slots=4, step_ms=2)
            with Client(cluster.clients_addr) as client:
                wait_until(
                    lambda: [a["name"] for a in client.agents()] == ["paced"],
                    what="only the paced agent",
                )
        except Exception:
            cluster.close()
            raise
        try:
            latencies = itl(cluster, 200 if quick else 1000)
            for name in list(cluster.agents):
                cluster.agents.pop(name).stop()
            for index in range(2):
                cluster.start_agent(f"fast{index}", slots=64, step_ms=0, tokens_per_step=16)
            with Client(cluster.clients_addr) as client:
                wait_until(
                    lambda: sorted(a["name"] for a in client.agents()) == ["fast0", "fast1"],
                    what="only the fast agents",
                )
            rate = asyncio.run(worker_rate(cluster, 20, 4000 if quick else 20000))
        finally:
            cluster.close()
    return {"ttft": ttft, "itl": latencies, "worker": rate, "samples": samples}


def report(result: dict[str, Any]) -> str:
    ttft = result["ttft"]
    zmq_p50 = ttft["zmq"]["p50_ms"]
    lines = [
        "## HTTP overhead (fake engine, one gunicorn worker)",
        "",
        "| path | TTFT p50 | TTFT p99 | added to ZMQ client p50 | target |",
        "|---|---:|---:|---:|---|",
    ]
    for name in ("direct", "zmq", "ndjson", "websocket", "sse_openai"):
        row = ttft.get(name, {})
        if "p50_ms" not in row:
            lines.append(f"| {name} | n/a | n/a | | {row.get('error', '')} |")
            continue
        added = row["p50_ms"] - zmq_p50
        target = ""
        if name in ("ndjson", "websocket", "sse_openai"):
            target = f"< {TARGET_ADDED_MS} ms: {'met' if added < TARGET_ADDED_MS else 'NOT met'}"
        lines.append(
            f"| {name} | {row['p50_ms']:.3f} ms | {row['p99_ms']:.3f} ms | "
            f"{added:+.3f} ms | {target} |"
        )
    lines += ["", "| path | inter-token p50 | p99 | (agent step 2 ms) |", "|---|---:|---:|---|"]
    for name, row in result["itl"].items():
        lines.append(f"| {name} | {row['p50_ms']:.3f} ms | {row['p99_ms']:.3f} ms | |")
    worker = result["worker"]
    met = worker["tokens_per_s"] >= TARGET_WORKER_TOKENS_PER_S
    lines += [
        "",
        f"One worker streamed {worker['tokens_per_s']:,} tokens/s to {worker['streams']} "
        f"concurrent NDJSON clients (target >= {TARGET_WORKER_TOKENS_PER_S:,}: "
        f"{'met' if met else 'NOT met'}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(args.quick)
    result.update(benchmark="http", quick=args.quick, machine=machine())
    result["summary_markdown"] = report(result)
    path = write_result("http", result)
    print(result["summary_markdown"])
    print(f"written {path}")


if __name__ == "__main__":
    main()
