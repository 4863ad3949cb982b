"""Broker benchmark: token forwarding throughput and added time to first token.

Runs a real balancer process and fake-engine agent processes (no model), once
with the compiled ``_core`` and once with the pure-Python twin, side by side:

- throughput: tokens/s and token frames/s the ZMQ client library receives through
  the broker, at 1, 10 and 100 concurrent streams, for 1 and 16 tokens per stream
  and step (an agent sends each step's frames, one per stream, as one ``BATCH``
  message, as real agents do);
- added latency: time to first token through the broker versus talking to an
  agent directly (this process plays a minimal broker: ROUTER, register, dispatch),
  same agent, same fake engine; the difference of the medians is what the broker adds;
- dispatch decision time with 10, 100 and 1,000 agents and 10,000 buffered requests;
- the cost of CurveZMQ, and of the token ids every token frame carries (so a stream
  can continue on another agent): the same runs with each off and on, side by side.

Usage: ``python -m benchmarks.broker [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from benchmarks.common import machine, summary_ms, write_result
from paddler.client import Client, Done, Failed, Tokens
from paddler.curve import PrivateKeys
from paddler.protocol.codec import HEADER, encode, messages_of, pack_body
from paddler.protocol.kinds import Kind
from paddler.protocol.requests import validate_request
from paddler.testing.cluster import LocalCluster, free_port, wait_until

TARGET_TOKENS_PER_S = 500_000
TARGET_ADDED_TTFT_MS = 1.0
TARGET_CURVE_THROUGHPUT_COST = 0.15
"""CurveZMQ may cost at most this share of the forwarding rate..."""
TARGET_CURVE_ADDED_TTFT_MS = 0.3
"""...and add at most this to the median time to first token."""


def impl_env(impl: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PADDLER_NO_EXTENSIONS"] = "1" if impl == "py" else "0"
    return env


def throughput(
    cluster: LocalCluster, streams: int, tokens: int, **client_options: Any
) -> dict[str, Any]:
    with Client(cluster.clients_addr, timeout_s=30, **client_options) as client:
        started = time.perf_counter()
        handles = [client.continue_from_raw_prompt("x", max_tokens=tokens) for _ in range(streams)]
        frames = 0
        count = 0
        for stream in handles:
            for event in stream:
                if isinstance(event, Tokens):
                    frames += 1
                    count += len(event.pieces)
                elif isinstance(event, Failed):
                    raise RuntimeError(event)
        elapsed = time.perf_counter() - started
    return {
        "streams": streams,
        "tokens": count,
        "frames": frames,
        "seconds": round(elapsed, 4),
        "tokens_per_s": round(count / elapsed),
        "frames_per_s": round(frames / elapsed),
    }


def ttft_through_broker(
    cluster: LocalCluster, samples: int, concurrency: int = 1, **client_options: Any
) -> list[float]:
    """Waves of ``concurrency`` requests sent together; each one's time to first token."""
    times: list[float] = []
    with Client(cluster.clients_addr, timeout_s=30, **client_options) as client:
        for _ in range(max(1, samples // concurrency)):
            started = time.perf_counter()
            streams = [
                client.continue_from_raw_prompt("x", max_tokens=1) for _ in range(concurrency)
            ]
            for stream in streams:
                for event in stream:
                    if isinstance(event, Tokens):
                        times.append(time.perf_counter() - started)
                    elif isinstance(event, Done | Failed):
                        break
    return times


def ttft_direct(
    env: dict[str, str], samples: int, log_dir: Path, concurrency: int = 1
) -> list[float]:
    """This process binds a ROUTER, a fake agent connects to it; waves of
    ``concurrency`` dispatches, each one's time to first token."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{free_port()}"
    router.bind(address)
    log = open(log_dir / "direct-agent.log", "ab")  # noqa: SIM115
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "paddler.testing.fake_agent",
            "--broker-addr",
            address,
            "--slots",
            str(concurrency),
            "--step-ms",
            "0",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    times: list[float] = []
    try:
        assert router.poll(10_000), "the agent did not connect"
        identity, header, _ = router.recv_multipart()
        assert HEADER.unpack(header)[0] == Kind.REGISTER
        router.send_multipart(
            [
                identity,
                *encode(
                    Kind.REGISTERED,
                    0,
                    {"agent_id": identity.decode(), "heartbeat_interval_ms": 1000},
                ),
            ]
        )
        # the wire form a broker dispatches (every field present)
        request = pack_body(validate_request({"raw_prompt": "x", "max_tokens": 1}))
        next_id = 1
        for _ in range(max(1, samples // concurrency)):
            started = time.perf_counter()
            wave = set(range(next_id, next_id + concurrency))
            next_id += concurrency
            for request_id in sorted(wave):
                router.send_multipart([identity, HEADER.pack(Kind.DISPATCH, request_id), request])
            while wave:
                assert router.poll(10_000)
                _, *frames = router.recv_multipart()  # tokens carry their ids too
                arrived = time.perf_counter()
                for message in messages_of(frames):  # a step's frames come as one
                    kind, rid = HEADER.unpack(message[0])
                    if kind == Kind.TOKENS and rid in wave:
                        times.append(arrived - started)
                    elif kind in (Kind.DONE, Kind.ERROR):
                        wave.discard(rid)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()
        router.close()
        context.term()
    return times


def dispatch_decision(impl: str) -> list[dict[str, Any]]:
    """Time of one choose-and-acquire plus release, in a subprocess for the implementation."""
    code = r"""
import json, sys, time
from paddler import _core
from paddler._core import Registry, RequestBuffer
out = []
for agents in (10, 100, 1000):
    registry = Registry()
    for i in range(agents):
        registry.add(b"agent-%d" % i, 4, True)
        for _ in range(i % 4):
            registry.acquire(b"agent-%d" % i)
    buffer = RequestBuffer(20000)
    for rid in range(10000):
        buffer.push(rid, 1e9 + rid)
    rounds = 20000 if agents < 1000 else 4000
    started = time.perf_counter()
    for _ in range(rounds):
        agent = registry.choose_and_acquire()
        rid = buffer.pop()
        buffer.push(rid, 1e9)
        registry.release(agent)
    elapsed = time.perf_counter() - started
    us = round(elapsed / rounds * 1e6, 3)
    out.append({"agents": agents, "buffered": len(buffer), "us_per_dispatch": us})
print(json.dumps({"impl": _core.IMPLEMENTATION, "rows": out}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=impl_env(impl),
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(result.stdout)
    assert data["impl"] == impl, f"asked for {impl}, got {data['impl']}"
    return data["rows"]  # type: ignore[no-any-return]


def run_impl(impl: str, quick: bool, log_root: Path) -> dict[str, Any]:
    env = impl_env(impl)
    out: dict[str, Any] = {"impl": impl}
    log_dir = log_root / impl
    cluster = LocalCluster(log_dir, max_buffered_requests=1000)
    cluster.env = env
    cluster.start_balancer()
    try:
        rows = []
        for tokens_per_step in (1, 16):
            for name in list(cluster.agents):
                cluster.agents.pop(name).stop()
            with Client(cluster.clients_addr, timeout_s=30) as client:
                wait_until(lambda c=client: c.agents() == [], what="agents gone")
            for i in range(2):
                cluster.start_agent(
                    f"agent-{tokens_per_step}-{i}",
                    slots=64,
                    step_ms=0,
                    tokens_per_step=tokens_per_step,
                )
            with Client(cluster.clients_addr, timeout_s=30) as client:
                cluster.wait_for_agents(client, 2)
            for streams in (1, 10, 100):
                total = (20_000 if quick else 60_000) * tokens_per_step
                per_stream = max(tokens_per_step, total // streams)
                row = throughput(cluster, streams, per_stream)
                row["tokens_per_frame"] = tokens_per_step
                rows.append(row)
        out["throughput"] = rows
        samples = 200 if quick else 1000
        through = {c: ttft_through_broker(cluster, samples, c) for c in (1, 10, 100)}
    finally:
        cluster.close()
    latency = []
    for concurrency in (1, 10, 100):
        direct = summary_ms(ttft_direct(env, samples, log_dir, concurrency))
        via = summary_ms(through[concurrency])
        latency.append(
            {
                "concurrency": concurrency,
                "direct": direct,
                "through_broker": via,
                "added_p50_ms": round(via["p50_ms"] - direct["p50_ms"], 4),
                "added_p99_ms": round(via["p99_ms"] - direct["p99_ms"], 4),
            }
        )
    out["latency"] = latency
    out["added_ttft_p50_ms"] = latency[0]["added_p50_ms"]
    out["dispatch_decision"] = dispatch_decision(impl)
    return out


def curve_run(curve: bool, quick: bool, log_root: Path, token_ids: bool = True) -> dict[str, Any]:
    """Forwarding rate and time to first token through a balancer with CurveZMQ off
    or on (compiled ``_core``; agents and the client authenticated when on), with
    agents that send token ids (as real ones do) or text only."""
    log_dir = log_root / f"curve-{'on' if curve else 'off'}-ids-{'on' if token_ids else 'off'}"
    keys = PrivateKeys("paddler-bench-keys-")
    options: dict[str, Any] = {}
    agent_options: dict[str, Any] = {} if token_ids else {"token_ids": "off"}
    client_options: dict[str, Any] = {}
    if curve:
        root = keys.path
        options = {
            "curve_secret_key": keys.make("broker"),
            "authorized_agent_keys": root / "agents",
            "authorized_client_keys": root / "clients",
        }
        broker_key = root / "broker.key"
        agent_options |= {
            "broker_public_key": broker_key,
            "curve_secret_key": keys.make("agent", root / "agents"),
        }
        client_options = {
            "broker_public_key": broker_key,
            "curve_secret_key": keys.make("client", root / "clients"),
        }
    cluster = LocalCluster(log_dir, max_buffered_requests=1000, **options)
    cluster.env = impl_env("c")
    cluster.start_balancer()
    out: dict[str, Any] = {"curve": curve, "token_ids": token_ids, "throughput": []}
    try:
        for tokens_per_step in (1, 16):
            for name in list(cluster.agents):
                cluster.agents.pop(name).stop()
            with Client(cluster.clients_addr, timeout_s=30, **client_options) as client:
                wait_until(lambda c=client: c.agents() == [], what="agents gone")
            for i in range(2):
                cluster.start_agent(
                    f"agent-{tokens_per_step}-{i}",
                    slots=64,
                    step_ms=0,
                    tokens_per_step=tokens_per_step,
                    **agent_options,
                )
            with Client(cluster.clients_addr, timeout_s=30, **client_options) as client:
                cluster.wait_for_agents(client, 2)
            total = (20_000 if quick else 60_000) * tokens_per_step
            row = throughput(cluster, 10, total // 10, **client_options)
            row["tokens_per_frame"] = tokens_per_step
            out["throughput"].append(row)
        samples = 200 if quick else 1000
        out["ttft"] = summary_ms(ttft_through_broker(cluster, samples, 1, **client_options))
    finally:
        cluster.close()
        keys.close()
    return out


SIDE_BY_SIDE_ROUNDS = 3
"""Rounds of each off/on comparison, alternating which goes first; medians reported
(one pair of runs moved by 30-50% either way on this machine)."""


def side_by_side(run: Any, rounds: int) -> list[dict[str, Any]]:
    """``run(False)`` and ``run(True)``, ``rounds`` times, alternating which goes
    first; for each flag the median of its runs (tokens/s per row, TTFT p50), with
    every run's figures under ``rounds``."""
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for index in range(rounds):
        for flag in (False, True) if index % 2 == 0 else (True, False):
            runs[flag].append(run(flag))
    return [_median_run(runs[flag]) for flag in (False, True)]


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    first = runs[0]
    rows = []
    for index, row in enumerate(first["throughput"]):
        rates = [run["throughput"][index]["tokens_per_s"] for run in runs]
        rows.append({**row, "tokens_per_s": round(median(rates)), "each": rates})
    p50s = [run["ttft"]["p50_ms"] for run in runs]
    return {
        **{key: value for key, value in first.items() if key not in ("throughput", "ttft")},
        "throughput": rows,
        "ttft": {"p50_ms": round(median(p50s), 3), "each_p50_ms": p50s},
        "rounds": len(runs),
    }


def _costs(off: dict[str, Any], on: dict[str, Any]) -> list[tuple[int, int, int, float]]:
    """``(tokens per frame, tokens/s off, tokens/s on, cost)`` of two side-by-side runs."""
    return [
        (
            row_off["tokens_per_frame"],
            row_off["tokens_per_s"],
            row_on["tokens_per_s"],
            1 - row_on["tokens_per_s"] / row_off["tokens_per_s"],
        )
        for row_off, row_on in zip(off["throughput"], on["throughput"], strict=True)
    ]


def curve_report(runs: list[dict[str, Any]]) -> list[str]:
    off, on = (next(r for r in runs if r["curve"] is flag) for flag in (False, True))
    lines = [
        "",
        "CurveZMQ off and on (compiled `_core`, 10 streams on 2 agents; time to first token "
        f"through the broker, 1 at a time; medians of {off.get('rounds', 1)} runs each, "
        "alternating which goes first):",
        "",
        "| tokens/step | tokens/s curve off | tokens/s curve on | cost | target |",
        "|---:|---:|---:|---:|---|",
    ]
    for per_frame, rate_off, rate_on, cost in _costs(off, on):
        met = cost <= TARGET_CURVE_THROUGHPUT_COST
        lines.append(
            f"| {per_frame} | {rate_off:,} | {rate_on:,} | {cost:.1%} | <= "
            f"{TARGET_CURVE_THROUGHPUT_COST:.0%}: {'met' if met else 'NOT met'} |"
        )
    added = on["ttft"]["p50_ms"] - off["ttft"]["p50_ms"]
    met = added <= TARGET_CURVE_ADDED_TTFT_MS
    lines += [
        "",
        f"Time to first token p50: {off['ttft']['p50_ms']:.3f} ms curve off, "
        f"{on['ttft']['p50_ms']:.3f} ms curve on: {added:+.3f} ms (target <= "
        f"{TARGET_CURVE_ADDED_TTFT_MS} ms: {'met' if met else 'NOT met'}).",
    ]
    return lines


def ids_report(runs: list[dict[str, Any]]) -> list[str]:
    off, on = (next(r for r in runs if r["token_ids"] is flag) for flag in (False, True))
    lines = [
        "",
        "Token ids off and on (each token frame carries its tokens' ids so the stream "
        "can continue on another agent; compiled `_core`, curve off, 10 streams; medians of "
        f"{off.get('rounds', 1)} runs each):",
        "",
        "| tokens/step | tokens/s text only | tokens/s with ids | cost |",
        "|---:|---:|---:|---:|",
    ]
    for per_frame, rate_off, rate_on, cost in _costs(off, on):
        lines.append(f"| {per_frame} | {rate_off:,} | {rate_on:,} | {cost:.1%} |")
    added = on["ttft"]["p50_ms"] - off["ttft"]["p50_ms"]
    lines += ["", f"Time to first token p50: {added:+.3f} ms with ids."]
    return lines


def report(result: dict[str, Any]) -> str:
    lines = ["## Broker", ""]
    lines.append("| impl | streams | tokens/step | tokens/s | token frames/s |")
    lines.append("|---|---:|---:|---:|---:|")
    for impl in result["impls"]:
        for row in impl["throughput"]:
            lines.append(
                f"| {impl['impl']} | {row['streams']} | {row['tokens_per_frame']} | "
                f"{row['tokens_per_s']:,} | {row['frames_per_s']:,} |"
            )
    lines += [
        "",
        "| impl | concurrent | TTFT direct p50 / p99 | via broker p50 / p99 "
        "| added p50 / p99 | target (1 stream) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for impl in result["impls"]:
        for row in impl["latency"]:
            added = row["added_p50_ms"]
            target = ""
            if row["concurrency"] == 1:
                met = added < TARGET_ADDED_TTFT_MS
                target = f"< {TARGET_ADDED_TTFT_MS} ms: {'met' if met else 'NOT met'}"
            d, v = row["direct"], row["through_broker"]
            lines.append(
                f"| {impl['impl']} | {row['concurrency']} | {d['p50_ms']:.3f} / "
                f"{d['p99_ms']:.3f} ms | {v['p50_ms']:.3f} / {v['p99_ms']:.3f} ms | "
                f"{added:+.3f} / {row['added_p99_ms']:+.3f} ms | {target} |"
            )
    best = max(r["tokens_per_s"] for i in result["impls"] for r in i["throughput"])
    lines += [
        "",
        f"Best forwarding rate: {best:,} tokens/s (target >= {TARGET_TOKENS_PER_S:,}: "
        f"{'met' if best >= TARGET_TOKENS_PER_S else 'NOT met'}).",
        "",
    ]
    lines += ["| impl | agents | buffered | µs per dispatch decision |", "|---|---:|---:|---:|"]
    for impl in result["impls"]:
        for row in impl["dispatch_decision"]:
            lines.append(
                f"| {impl['impl']} | {row['agents']} | {row['buffered']} | "
                f"{row['us_per_dispatch']} |"
            )
    if result.get("curve"):
        lines += curve_report(result["curve"])
    if result.get("token_ids"):
        lines += ids_report(result["token_ids"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="paddler-bench-") as tmp:
        impls = [run_impl(impl, args.quick, Path(tmp)) for impl in ("c", "py")]
        rounds = 1 if args.quick else SIDE_BY_SIDE_ROUNDS
        curve = side_by_side(lambda flag: curve_run(flag, args.quick, Path(tmp)), rounds)
        ids = side_by_side(
            lambda flag: curve_run(False, args.quick, Path(tmp), token_ids=flag), rounds
        )
    result = {
        "benchmark": "broker",
        "quick": args.quick,
        "machine": machine(),
        "impls": impls,
        "curve": curve,
        "token_ids": ids,
    }
    result["summary_markdown"] = report(result)
    path = write_result("broker", result)
    print(result["summary_markdown"])
    print(f"written {path}")


if __name__ == "__main__":
    main()
