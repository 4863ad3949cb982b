"""Cluster benchmark: open-loop load against a cluster like ``paddler cluster`` makes
(``paddler balancer`` + ``paddler agent`` processes) with three agents of different
slot counts (1, 2 and 4), at about 50%, 80% and 110% of capacity, under the
slot-aware dispatch policy and under round robin, side by side.

Two kinds of agents:

- ``llama``: real llama.cpp agents on the tiny test model. On this 2-core machine
  the agents share the CPU, so a 4-slot agent is not 4x a 1-slot one;
- ``fixed-step``: fake-engine agents whose decode step takes a fixed 20 ms whatever
  the batch, as on a GPU: a 4-slot agent really serves 4x a 1-slot one. This is the
  case slot-aware balancing is for.

Capacity is measured first: the completed requests per second when every slot
is kept busy (a closed loop of 2x the slots), with the same request mix.
Usage: ``python -m benchmarks.cluster [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, write_result
from benchmarks.loadgen import RequestShape, mean_output_tokens, open_loop, request_mix
from paddler.client import AsyncClient, Client, Tokens
from paddler.testing.cluster import free_port, wait_until

SLOTS = (1, 2, 4)
LOADS = (0.5, 0.8, 1.1)
POLICIES = ("slots", "round-robin")
SEED = 42
FIXED_STEP_MS = 20.0


class Cluster:
    """Three agents with different slot counts: ``paddler balancer`` + ``paddler agent``."""

    def __init__(self, policy: str, log_dir: Path, engine: str) -> None:
        self.clients_addr = f"tcp://127.0.0.1:{free_port()}"
        agents_addr = f"tcp://127.0.0.1:{free_port()}"
        python = [sys.executable, "-m", "paddler"]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(log_dir / f"cluster-{policy}.log", "ab")  # noqa: SIM115
        common = {"stdout": self.log, "stderr": subprocess.STDOUT, "start_new_session": True}
        self.processes = [
            subprocess.Popen(
                [
                    *python,
                    "balancer",
                    "--agents-addr",
                    agents_addr,
                    "--clients-addr",
                    self.clients_addr,
                    "--dispatch-policy",
                    policy,
                    "--max-buffered-requests",
                    "1000",
                    "--buffered-request-timeout",
                    "60000",
                    "--inference-addr",
                    f"127.0.0.1:{free_port()}",
                    "--management-addr",
                    f"127.0.0.1:{free_port()}",
                    "--http-workers",
                    "1",
                    "--log-level",
                    "warning",
                ],
                **common,
            )
        ]
        for slots in SLOTS:
            if engine == "llama":
                argv = [*python, "agent", "--threads", "1", "--log-level", "warning"]
            else:
                argv = [
                    sys.executable,
                    "-m",
                    "paddler.testing.fake_agent",
                    "--step-ms",
                    str(FIXED_STEP_MS),
                ]
            self.processes.append(
                subprocess.Popen(
                    [
                        *argv,
                        "--broker-addr",
                        agents_addr,
                        "--slots",
                        str(slots),
                        "--name",
                        f"agent-{slots}-slots",
                    ],
                    **common,
                )
            )
        from paddler.testing.tiny_model import default_model_path

        with Client(self.clients_addr, timeout_s=30) as client:
            client.put_desired_state(
                {
                    "model": {"LocalToAgent": str(default_model_path())},
                    "inference_parameters": {
                        "context_size": 1024,
                        "temperature": 0.0,
                        "k_cache_dtype": "F16",
                        "v_cache_dtype": "F16",
                    },
                }
            )
            wait_until(
                lambda: len(a := client.agents()) == 3 and all(x["ready"] for x in a),
                timeout_s=60,
                what="3 agents ready",
            )

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.log.close()


async def capacity(address: str, shapes: list[RequestShape], duration_s: float) -> float:
    """Requests/s the cluster sustains: output tokens/s with every slot busy (a closed
    loop of 2x the slots) divided by the mix's mean output tokens per request."""
    tokens = 0
    async with await AsyncClient.connect(address, timeout_s=60) as client:
        deadline = time.perf_counter() + duration_s

        async def worker(offset: int) -> None:
            nonlocal tokens
            index = offset
            while time.perf_counter() < deadline:
                shape = shapes[index % len(shapes)]
                stream = await client.continue_from_raw_prompt(
                    "count tokens", max_tokens=shape.max_tokens, temperature=0.0
                )
                async for event in stream:
                    if isinstance(event, Tokens):
                        tokens += len(event.pieces)
                    if time.perf_counter() >= deadline:
                        stream.cancel()
                        break
                index += 7

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(2 * sum(SLOTS))))
        rate = tokens / (time.perf_counter() - started)
    return rate / mean_output_tokens(shapes)


def run(quick: bool, engines: tuple[str, ...]) -> dict[str, Any]:
    shapes = request_mix(400, SEED)
    duration = 4.0 if quick else 20.0
    rows = []
    capacities = {}
    with tempfile.TemporaryDirectory(prefix="paddler-bench-") as tmp:
        for engine in engines:
            cluster = Cluster("slots", Path(tmp), engine)
            try:
                rate = asyncio.run(capacity(cluster.clients_addr, shapes, duration / 2))
            finally:
                cluster.close()
            capacities[engine] = round(rate, 2)
            for policy in POLICIES:
                cluster = Cluster(policy, Path(tmp), engine)
                try:
                    for load in LOADS:
                        row = asyncio.run(
                            open_loop(cluster.clients_addr, rate * load, duration, shapes, SEED)
                        )
                        row.update(engine=engine, policy=policy, load=load)
                        rows.append(row)
                        print(
                            engine,
                            policy,
                            load,
                            row["ttft"]["p50_ms"],
                            row["e2e"]["p99_ms"],
                            row["errors"],
                            flush=True,
                        )
                finally:
                    cluster.close()
    return {
        "capacity_requests_per_s": capacities,
        "rows": rows,
        "slots": list(SLOTS),
        "duration_s": duration,
        "seed": SEED,
        "fixed_step_ms": FIXED_STEP_MS,
    }


def report(result: dict[str, Any]) -> str:
    capacity_text = ", ".join(
        f"{engine}: {rate} requests/s" for engine, rate in result["capacity_requests_per_s"].items()
    )
    lines = [
        "## Cluster: slot-aware dispatch vs round robin",
        "",
        f"Three agents with {', '.join(map(str, result['slots']))} slots; capacity "
        f"{capacity_text}; {result['duration_s']} s of Poisson arrivals per row "
        f"(seed {result['seed']}). `llama`: real agents on the tiny model, sharing 2 "
        f"cores; `fixed-step`: agents whose step takes {result['fixed_step_ms']:g} ms "
        "whatever the batch, as on a GPU.",
        "",
        "| agents | policy | load | TTFT p50/p90/p99 ms | ITL p50/p99 ms "
        "| E2E p50/p90/p99 ms | output tok/s | errors |",
        "|---|---|---:|---|---|---|---:|---|",
    ]
    for row in result["rows"]:
        t, i, e = row["ttft"], row["itl"], row["e2e"]
        errors = ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) or "none"
        ttft = f"{t['p50_ms']:.0f} / {t['p90_ms']:.0f} / {t['p99_ms']:.0f}"
        inter = f"{i['p50_ms']:.1f} / {i['p99_ms']:.1f}"
        e2e = f"{e['p50_ms']:.0f} / {e['p90_ms']:.0f} / {e['p99_ms']:.0f}"
        lines.append(
            f"| {row['engine']} | {row['policy']} | {row['load']:.0%} | {ttft} | {inter} | "
            f"{e2e} | {row['output_tokens_per_s']} | {errors} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter rows, fixed-step agents only")
    args = parser.parse_args()
    result = run(args.quick, ("fixed-step",) if args.quick else ("fixed-step", "llama"))
    result.update(benchmark="cluster", quick=args.quick, machine=machine())
    result["summary_markdown"] = report(result)
    path = write_result("cluster", result)
    print(result["summary_markdown"])
    print(f"written {path}")


if __name__ == "__main__":
    main()
