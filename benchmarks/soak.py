"""Soak benchmark: a real cluster under mixed HTTP load for minutes, watching for errors
and for memory that keeps growing.

The cluster is what ``paddler cluster`` runs: ``paddler balancer`` (the broker, and
gunicorn with two workers: one for management, one for inference and OpenAI) with its
inference, management and OpenAI services, and ``paddler agent`` processes on the tiny
test model. Capacity is measured first: the requests/s of the mix below finished by a
closed loop of 2x the slots (on 2 cores the HTTP worker and this load generator bound it
as much as the agents do); then Poisson arrivals at ``LOAD`` of it, for ``--duration``
seconds, spread over:

- native NDJSON: ``/api/v1/continue_from_raw_prompt`` and
  ``/api/v1/continue_from_conversation_history``;
- the WebSocket ``/api/v1/inference_socket`` (one connection per request, as a browser
  tab would);
- OpenAI ``/v1/chat/completions`` with ``stream: true`` (SSE);
- embeddings, native (``/api/v1/generate_embedding_batch``) and OpenAI (``/v1/embeddings``);

and a management poller (agents, metrics, health) every few seconds. A tenth of all
requests are cancelled by their client mid-stream: it closes the connection after a few
tokens. The RSS of every process (broker, gunicorn master, each worker, each agent) is
read from ``/proc/<pid>/status`` every few seconds; after a warm-up, a least-squares line
through each process's samples gives its growth per 10 minutes (goal: under 5%).

Usage: ``python -m benchmarks.soak [--quick] [--duration SECONDS]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect as websocket_connect

from benchmarks.common import machine, percentile, summary_ms, write_result
from benchmarks.loadgen import RequestShape, prompt_text, request_mix
from paddler.client import AsyncClient, Client
from paddler.testing.cluster import LocalCluster, free_port, wait_until
from paddler.testing.tiny_model import default_model_path

AGENTS = 2
SLOTS_PER_AGENT = 2
HTTP_WORKERS = 2
LOAD = 0.7
CANCEL_FRACTION = 0.10
GOAL_PERCENT_PER_10_MIN = 5.0
SEED = 7
REQUEST_TIMEOUT_S = 120.0
MAX_IN_FLIGHT = 100
"""Arrivals past this many running requests are skipped (and counted)."""
MIX = (
    ("ndjson_raw", 0.25),
    ("ndjson_chat", 0.15),
    ("websocket", 0.20),
    ("openai_chat_sse", 0.25),
    ("embeddings_native", 0.075),
    ("embeddings_openai", 0.075),
)
"""Request kinds and their shares of the arrivals."""
GENERATION_SHARE = sum(share for kind, share in MIX if not kind.startswith("embeddings"))


@dataclass(frozen=True)
class Plan:
    duration_s: float
    warmup_s: float
    sample_every_s: float
    capacity_s: float


FULL = Plan(duration_s=600.0, warmup_s=120.0, sample_every_s=5.0, capacity_s=20.0)
QUICK = Plan(duration_s=60.0, warmup_s=30.0, sample_every_s=2.0, capacity_s=6.0)


# ------------------------------------------------------------------ processes


def rss_kb(pid: int) -> int | None:
    """``VmRSS`` of ``pid`` in kB; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def children_of() -> dict[int, list[int]]:
    """Every process's children, from ``/proc/<pid>/stat``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the ppid follows the last ")"
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    return children


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def listening_ports(pid: int) -> set[int]:
    """The TCP ports ``pid`` holds a listening socket on (a gunicorn worker keeps only
    its role's listeners)."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A":  # LISTEN
                inodes[parts[9]] = int(parts[1].rsplit(":", 1)[1], 16)
    ports: set[int] = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return ports
    for descriptor in descriptors:
        try:
            target = descriptor.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            port = inodes.get(target[8:-1])
            if port is not None:
                ports.add(port)
    return ports


class ProcessWatch:
    """The processes of the cluster by name, found again at every sample (a replaced
    gunicorn worker gets a new name: ``worker-<role>-<pid>``)."""

    def __init__(self, cluster: LocalCluster, management_port: int) -> None:
        self.cluster = cluster
        self.management_port = management_port
        self.names: dict[int, str] = {}

    def current(self) -> dict[str, int]:
        assert self.cluster.balancer is not None
        broker = self.cluster.balancer.pid
        found = {"broker": broker}
        children = children_of()
        for master in children.get(broker, []):
            if "gunicorn" not in command_line(master):
                continue
            found["gunicorn-master"] = master
            for worker in children.get(master, []):
                name = self.names.get(worker)
                if name is None:
                    role = (
                        "management"
                        if self.management_port in listening_ports(worker)
                        else "inference"
                    )
                    name = self.names[worker] = f"worker-{role}-{worker}"
                found[name] = worker
        for agent_name, process in self.cluster.agents.items():
            found[agent_name] = process.pid
        return found


@dataclass
class Samples:
    started: float
    series: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    """Process name -> (seconds since the start, RSS kB)."""
    context: list[tuple[float, int, float]] = field(default_factory=list)
    """(seconds since the start, requests in flight, the machine's 1-minute load average)."""

    def take(self, processes: dict[str, int], in_flight: int = 0) -> None:
        now = round(time.monotonic() - self.started, 2)
        for name, pid in processes.items():
            value = rss_kb(pid)
            if value is not None:
                self.series.setdefault(name, []).append((now, value))
        self.context.append((now, in_flight, round(os.getloadavg()[0], 2)))


async def sample_forever(watch: ProcessWatch, samples: Samples, every_s: float, soak: Soak) -> None:
    while True:
        samples.take(watch.current(), len(soak.running))
        await asyncio.sleep(every_s)


def slope_kb_per_s(points: list[tuple[float, int]]) -> float:
    n = len(points)
    if n < 2:
        return float("nan")
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return float("nan")
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


def growth(points: list[tuple[float, int]], warmup_s: float) -> dict[str, Any]:
    """RSS after the warm-up: the line through the samples, as MB and % per 10 minutes
    (of the RSS at the end of the warm-up); the two halves of the window apart, to tell
    a steady climb from one that levels off."""
    after = [(t, v) for t, v in points if t >= warmup_s]
    if len(after) < 4:
        return {"samples": len(after)}
    slope = slope_kb_per_s(after)
    base = after[0][1]
    half = len(after) // 2
    first, second = slope_kb_per_s(after[: half + 1]), slope_kb_per_s(after[half:])
    return {
        "samples": len(after),
        "rss_start_mb": round(points[0][1] / 1024, 2),
        "rss_after_warmup_mb": round(base / 1024, 2),
        "rss_end_mb": round(after[-1][1] / 1024, 2),
        "rss_max_mb": round(max(v for _, v in points) / 1024, 2),
        "mb_per_10_min": round(slope * 600 / 1024, 3),
        "percent_per_10_min": round(slope * 600 / base * 100, 2),
        "first_half_mb_per_10_min": round(first * 600 / 1024, 3),
        "second_half_mb_per_10_min": round(second * 600 / 1024, 3),
    }


# ---------------------------------------------------------------------- load


@dataclass
class Outcome:
    kind: str
    planned_cancel: bool
    status: str = "unfinished"
    """``done``, ``cancelled`` (by this client, as planned), ``error`` or ``unfinished``."""
    error: str | None = None
    tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None


class Request:
    """One request of the mix, sent over its channel; records its outcome."""

    def __init__(self, soak: Soak, kind: str, shape: RequestShape, index: int, rng: random.Random):
        self.soak = soak
        self.kind = kind
        self.shape = shape
        self.index = index
        generation = not kind.startswith("embeddings")
        cancel = generation and rng.random() < CANCEL_FRACTION / GENERATION_SHARE
        self.outcome = Outcome(kind, cancel)
        # a cancelled request leaves after this many tokens, before its end
        self.leave_after = rng.randint(1, max(1, shape.max_tokens // 2)) if cancel else None
        self.started = time.perf_counter()

    def token(self, count: int = 1) -> bool:
        """Count tokens; True when the client should now leave (a planned cancel)."""
        if self.outcome.ttft_s is None:
            self.outcome.ttft_s = time.perf_counter() - self.started
        self.outcome.tokens += count
        return self.leave_after is not None and self.outcome.tokens >= self.leave_after

    def end(self, status: str, error: str | None = None) -> None:
        if self.outcome.status == "unfinished":
            self.outcome.status = status
            self.outcome.error = error
            self.outcome.e2e_s = time.perf_counter() - self.started

    async def run(self) -> Outcome:
        try:
            await asyncio.wait_for(getattr(self, self.kind)(), REQUEST_TIMEOUT_S)
        except TimeoutError:
            self.end("error", f"{self.kind}: no end within {REQUEST_TIMEOUT_S:g} s")
        except Exception as exc:
            self.end("error", f"{self.kind}: {type(exc).__name__}")
        if self.outcome.status == "unfinished":
            self.end("error", f"{self.kind}: stream ended without Done")
        return self.outcome

    # ------------------------------------------------------------- channels

    def prompt(self) -> str:
        return prompt_text(self.shape.prompt_words, self.index)

    async def ndjson(self, path: str, body: dict[str, Any]) -> None:
        url = self.soak.inference_url + path
        async with self.soak.http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                self.end("error", f"{self.kind}: HTTP {response.status_code}")
                return
            async for text in response.aiter_lines():
                if not text:
                    continue
                leave = self.envelope(json.loads(text))
                if leave:
                    self.end("cancelled")
                    return  # leaving the block closes the connection mid-stream
                if self.outcome.status != "unfinished":
                    return

    def envelope(self, message: dict[str, Any]) -> bool:
        """Take one NDJSON line or WebSocket message; True to leave now."""
        if "Error" in message:
            code = message["Error"]["error"]["code"]
            self.end("error", f"{self.kind}: Error {code}")
            return False
        value = message["Response"]["response"]
        if "GeneratedToken" in value:
            token = value["GeneratedToken"]
            if "ContentToken" in token:
                return self.token()
            if "Done" in token:
                self.end("done")
            else:
                self.end("error", f"{self.kind}: {next(iter(token))}")
            return False
        embedding = value.get("Embedding")
        if embedding == "Done":
            self.end("done")
        elif isinstance(embedding, dict) and "Error" in embedding:
            self.end("error", f"{self.kind}: Embedding Error")
        elif embedding == "EmbeddingsDisabled":
            self.end("error", f"{self.kind}: EmbeddingsDisabled")
        else:
            self.token()
        return False

    async def ndjson_raw(self) -> None:
        body = {"raw_prompt": self.prompt(), "max_tokens": self.shape.max_tokens}
        await self.ndjson("/api/v1/continue_from_raw_prompt", body)

    def conversation(self) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": "You are a soak test."},
            {"role": "user", "content": self.prompt()},
        ]

    async def ndjson_chat(self) -> None:
        body = {"conversation_history": self.conversation(), "max_tokens": self.shape.max_tokens}
        await self.ndjson("/api/v1/continue_from_conversation_history", body)

    async def websocket(self) -> None:
        url = self.soak.inference_url.replace("http://", "ws://") + "/api/v1/inference_socket"
        request = {
            "ContinueFromRawPrompt": {
                "raw_prompt": self.prompt(),
                "max_tokens": self.shape.max_tokens,
            }
        }
        async with websocket_connect(url, open_timeout=30, max_size=None) as socket:
            await socket.send(json.dumps({"Request": {"id": "r", "request": request}}))
            async for text in socket:
                if self.envelope(json.loads(text)):
                    self.end("cancelled")
                    return  # leaving the block closes the connection mid-stream
                if self.outcome.status != "unfinished":
                    return

    async def openai_chat_sse(self) -> None:
        body: dict[str, Any] = {
            "messages": self.conversation(),
            "max_tokens": self.shape.max_tokens,
            "stream": True,
        }
        if self.index % 2:
            body["model"] = "tiny"  # the other half asks the balancer which model it serves
        url = self.soak.openai_url + "/v1/chat/completions"
        finished = False
        async with self.soak.http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                self.end("error", f"{self.kind}: HTTP {response.status_code}")
                return
            async for text in response.aiter_lines():
                if not text.startswith("data: "):
                    continue
                data = text[6:]
                if data == "[DONE]":
                    self.end("done" if finished else "error", None if finished else "no finish")
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    self.end("error", f"{self.kind}: error {chunk['error'].get('code')}")
                    continue
                for choice in chunk["choices"]:
                    if choice["delta"].get("content") and self.token():
                        self.end("cancelled")
                        return
                    finished = finished or choice["finish_reason"] is not None

    def documents(self) -> list[str]:
        count = 1 + self.index % 4
        return [prompt_text(1 + (self.index + i) % 12, self.index + i) for i in range(count)]

    async def embeddings_native(self) -> None:
        body = {
            "input_batch": [
                {"id": str(i), "content": text} for i, text in enumerate(self.documents())
            ],
            "normalization_method": "L2",
        }
        await self.ndjson("/api/v1/generate_embedding_batch", body)

    async def embeddings_openai(self) -> None:
        documents = self.documents()
        response = await self.soak.http.post(
            self.soak.openai_url + "/v1/embeddings", json={"input": documents, "model": "tiny"}
        )
        if response.status_code != 200:
            self.end("error", f"{self.kind}: HTTP {response.status_code}")
        elif len(response.json()["data"]) != len(documents):
            self.end("error", f"{self.kind}: wrong number of embeddings")
        else:
            self.token(len(documents))
            self.end("done")


class Soak:
    def __init__(self, cluster: LocalCluster) -> None:
        assert cluster.openai_url is not None
        self.cluster = cluster
        self.inference_url = cluster.inference_url
        self.openai_url = cluster.openai_url
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=30),
            limits=httpx.Limits(max_connections=400, max_keepalive_connections=64),
        )
        self.management_errors: Counter[str] = Counter()
        self.management_polls = 0
        self.running: set[asyncio.Task[Outcome]] = set()
        """The requests of ``load`` still running."""

    async def capacity(self, duration_s: float) -> dict[str, Any]:
        """Requests/s of the mix the cluster (and this load generator) finish with every
        slot busy: a closed loop of 2x the slots, each client sending the next request of
        the mix (no cancellations) as soon as the last one ended."""
        shapes = request_mix(1000, SEED)
        kinds = [kind for kind, _ in MIX]
        weights = [share for _, share in MIX]
        rng = random.Random(SEED)
        done = 0
        tokens = 0
        errors: Counter[str] = Counter()
        deadline = time.perf_counter() + duration_s

        async def client(index: int) -> None:
            nonlocal done, tokens
            while time.perf_counter() < deadline:
                kind = rng.choices(kinds, weights)[0]
                request = Request(self, kind, shapes[index % len(shapes)], index, rng)
                request.leave_after = None
                request.outcome.planned_cancel = False
                outcome = await request.run()
                tokens += outcome.tokens
                if outcome.status == "done":
                    done += 1
                else:
                    errors[outcome.error or outcome.status] += 1
                index += 2 * AGENTS * SLOTS_PER_AGENT

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(2 * AGENTS * SLOTS_PER_AGENT)))
        elapsed = time.perf_counter() - started
        if not done:
            raise RuntimeError(f"no request finished while measuring capacity: {dict(errors)}")
        return {
            "requests_per_s": round(done / elapsed, 2),
            "output_tokens_per_s": round(tokens / elapsed, 1),
            "errors": dict(errors),
        }

    async def poll_management(self, every_s: float) -> None:
        """What an operator's dashboard does: agents, metrics, health."""
        management = self.cluster.management_url
        urls = (
            f"{management}/api/v1/agents",
            f"{management}/metrics",
            f"{management}/health",
            f"{self.inference_url}/health",
            f"{self.openai_url}/v1/models",
        )
        while True:
            for url in urls:
                try:
                    response = await self.http.get(url)
                    if response.status_code != 200:
                        self.management_errors[f"{url}: HTTP {response.status_code}"] += 1
                except Exception as exc:
                    self.management_errors[f"{url}: {type(exc).__name__}"] += 1
            self.management_polls += 1
            await asyncio.sleep(every_s)

    async def load(self, rate_per_s: float, duration_s: float) -> tuple[list[Outcome], int]:
        """Poisson arrivals of the mix at ``rate_per_s`` for ``duration_s``; waits for all.
        Also: how many arrivals were skipped because ``MAX_IN_FLIGHT`` requests were
        still running (an open loop whose server, or load generator, falls behind
        would otherwise pile up requests without bound)."""
        rng = random.Random(SEED + 1)
        shapes = request_mix(1000, SEED)
        kinds = [kind for kind, _ in MIX]
        weights = [share for _, share in MIX]
        outcomes: list[Outcome] = []
        running = self.running
        skipped = 0

        def finished(task: asyncio.Task[Outcome]) -> None:
            running.discard(task)
            outcomes.append(task.result())

        started = time.perf_counter()
        next_at = started
        index = 0
        while next_at - started < duration_s:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            kind = rng.choices(kinds, weights)[0]
            request = Request(self, kind, shapes[index % len(shapes)], index, rng)
            if len(running) < MAX_IN_FLIGHT:
                task = asyncio.ensure_future(request.run())
                running.add(task)
                task.add_done_callback(finished)
            else:
                skipped += 1
            index += 1
            next_at += rng.expovariate(rate_per_s)
        while running:
            await asyncio.wait(set(running))
        return outcomes, skipped


def start_cluster(log_dir: Path) -> LocalCluster:
    cluster = LocalCluster(
        log_dir,
        compat_openai_addr=f"127.0.0.1:{free_port()}",
        http_workers=HTTP_WORKERS,
        max_buffered_requests=1000,
        buffered_request_timeout=60000,
        log_level="warning",
    )
    try:
        cluster.start_balancer()
        cluster.wait_for_http()
        for number in range(AGENTS):
            cluster.start_real_agent(
                f"agent-{number + 1}", slots=SLOTS_PER_AGENT, threads=1, log_level="warning"
            )
        client = cluster.client(timeout_s=30)
        client.put_desired_state(
            {
                "model": {"LocalToAgent": str(default_model_path())},
                "inference_parameters": {
                    "context_size": 1024,
                    "temperature": 0.0,
                    "k_cache_dtype": "F16",
                    "v_cache_dtype": "F16",
                    "enable_embeddings": True,
                },
            }
        )
        wait_until(
            lambda: len(a := client.agents()) == AGENTS and all(x["ready"] for x in a),
            timeout_s=60,
            what=f"{AGENTS} agents ready",
        )
    except BaseException:
        cluster.close()
        raise
    return cluster


def broker_state(client: Client) -> dict[str, Any]:
    snapshot = client.metrics()
    return {
        "requests_by_outcome": dict(snapshot["metrics"]["requests"]),
        "buffered": snapshot["buffered"],
        "slots_processing": sum(agent["slots_processing"] for agent in snapshot["agents"]),
        "dropped_frames": snapshot["metrics"].get("dropped_frames", 0),
    }


async def soak(cluster: LocalCluster, plan: Plan) -> dict[str, Any]:
    soak = Soak(cluster)
    management_port = int(cluster.management_url.rsplit(":", 1)[1])
    watch = ProcessWatch(cluster, management_port)
    try:
        capacity = await soak.capacity(plan.capacity_s)
        print("capacity", capacity, flush=True)
        async with await AsyncClient.connect(cluster.clients_addr, timeout_s=30) as client:
            before = dict((await client.metrics())["metrics"]["requests"])
        rate = capacity["requests_per_s"] * LOAD
        # RSS from the start of the mixed load: the warm-up is measured too, and left out
        # of the growth
        samples = Samples(time.monotonic())
        sampler = asyncio.ensure_future(sample_forever(watch, samples, plan.sample_every_s, soak))
        poller = asyncio.ensure_future(soak.poll_management(2.0))
        started = time.perf_counter()
        try:
            outcomes, skipped = await soak.load(rate, plan.duration_s)
            elapsed = time.perf_counter() - started
            await asyncio.sleep(plan.sample_every_s)  # the requests' ends have reached all
            samples.take(watch.current())
        finally:
            for task in (sampler, poller):
                task.cancel()
            await asyncio.gather(sampler, poller, return_exceptions=True)
    finally:
        await soak.http.aclose()
    return {
        "capacity": capacity,
        "offered_rate_per_s": round(rate, 2),
        "elapsed_s": round(elapsed, 1),
        "outcomes": outcomes,
        "skipped_arrivals": skipped,
        "broker_outcomes_before": before,
        "samples": samples.series,
        "context": samples.context,
        "management_polls": soak.management_polls,
        "management_errors": dict(soak.management_errors),
    }


def summarize(raw: dict[str, Any], plan: Plan, state: dict[str, Any]) -> dict[str, Any]:
    outcomes: list[Outcome] = raw["outcomes"]
    errors = Counter(
        o.error or "unknown"
        for o in outcomes
        if o.status != "done" and not (o.status == "cancelled" and o.planned_cancel)
    )
    errors.update(raw["management_errors"])
    by_kind: dict[str, Any] = {}
    for kind, _ in MIX:
        mine = [o for o in outcomes if o.kind == kind]
        done = [o for o in mine if o.status == "done"]
        by_kind[kind] = {
            "requests": len(mine),
            "done": len(done),
            "cancelled": sum(o.status == "cancelled" for o in mine),
            "ttft": summary_ms([o.ttft_s for o in done if o.ttft_s is not None]),
            "e2e": summary_ms([o.e2e_s for o in done if o.e2e_s is not None]),
        }
    processes = {
        name: growth(points, plan.warmup_s) for name, points in sorted(raw["samples"].items())
    }
    after = Counter(state["requests_by_outcome"])
    after.subtract(raw["broker_outcomes_before"])
    state = {**state, "requests_by_outcome_during_soak": dict(+after)}
    workers = [name for name in processes if name.startswith("worker-")]
    if len(workers) != HTTP_WORKERS:
        errors[f"gunicorn workers seen: {len(workers)} (a worker was replaced)"] += 1
    return {
        "capacity": raw["capacity"],
        "offered_rate_per_s": raw["offered_rate_per_s"],
        "elapsed_s": raw["elapsed_s"],
        "requests": len(outcomes),
        "done": sum(o.status == "done" for o in outcomes),
        "cancelled_by_client": sum(o.status == "cancelled" for o in outcomes),
        "errors": dict(errors),
        "by_kind": by_kind,
        "management_polls": raw["management_polls"],
        "broker_after": state,
        "rss": processes,
        "skipped_arrivals": raw["skipped_arrivals"],
        "max_in_flight": max((n for _, n, _ in raw["context"]), default=0),
        "load_average_1_min": {
            "median": percentile([a for _, _, a in raw["context"]], 50),
            "max": max((a for _, _, a in raw["context"]), default=0.0),
        },
        "samples": raw["samples"],
        "context": raw["context"],
    }


def run(plan: Plan) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="paddler-soak-") as tmp:
        cluster = start_cluster(Path(tmp))
        try:
            raw = asyncio.run(soak(cluster, plan))
            client = cluster.client(timeout_s=30)
            # every request has ended: the broker holds none (buffered or on a slot)
            try:
                state = wait_until(
                    lambda: (
                        s
                        if not (s := broker_state(client))["buffered"] and not s["slots_processing"]
                        else None
                    ),
                    timeout_s=10,
                    interval_s=0.5,
                    what="the broker idle",
                )
            except TimeoutError:
                state = broker_state(client)
        finally:
            cluster.close()
            for path in sorted(Path(tmp).glob("*.log")):
                text = path.read_text(errors="replace")
                if "Traceback" in text:
                    print(f"----- {path.name} (last 3000 characters)\n{text[-3000:]}")
    result = summarize(raw, plan, state)
    if state["buffered"] or state["slots_processing"]:
        result["errors"]["broker still holding requests after the soak"] = 1
    return result


def report(result: dict[str, Any]) -> str:
    plan = result["plan"]
    capacity = result["capacity"]
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(result["errors"].items())) or "none"
    outcomes = result["broker_after"]["requests_by_outcome_during_soak"]
    lines = [
        "## Soak: mixed HTTP load, errors and memory",
        "",
        f"{AGENTS} real agents ({SLOTS_PER_AGENT} slots each, tiny model), {HTTP_WORKERS} "
        f"gunicorn workers; capacity {capacity['requests_per_s']} requests/s "
        f"({capacity['output_tokens_per_s']} tokens/s); {result['elapsed_s']} s of Poisson "
        f"arrivals at {LOAD:.0%} of it ({result['offered_rate_per_s']}/s): "
        f"{result['requests']} requests, {result['done']} done, "
        f"{result['cancelled_by_client']} cancelled by their clients mid-stream; "
        f"{result['management_polls']} management polls. **Errors: {errors}** (target: none); "
        f"arrivals skipped because {MAX_IN_FLIGHT} requests were in flight: "
        f"{result['skipped_arrivals']} (the most in flight at a sample: "
        f"{result['max_in_flight']}; the machine's load average, median "
        f"{result['load_average_1_min']['median']}, at most "
        f"{result['load_average_1_min']['max']}, on {result['machine']['cpus']} cores). "
        f"The broker counted {', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))} "
        "(a request its client left after its last token was sent is done there; "
        "embedding batches fan out into one request per agent).",
        "",
        "| kind | requests | done | cancelled | TTFT p50/p99 ms | E2E p50/p99 ms |",
        "|---|---:|---:|---:|---|---|",
    ]
    for kind, row in result["by_kind"].items():
        t, e = row["ttft"], row["e2e"]
        lines.append(
            f"| {kind} | {row['requests']} | {row['done']} | {row['cancelled']} | "
            f"{t['p50_ms']:.0f} / {t['p99_ms']:.0f} | {e['p50_ms']:.0f} / {e['p99_ms']:.0f} |"
        )
    lines += [
        "",
        f"RSS of every process, growth after a {plan['warmup_s']:g} s warm-up: a least-squares "
        f"line through samples every {plan['sample_every_s']:g} s, per 10 minutes "
        f"(target: under {GOAL_PERCENT_PER_10_MIN:g}%), and the two halves of that window."
        + (
            " Quick run: a 1 MB step in its half minute reads as 10-20% per 10 minutes, so "
            "growth is only judged over the full run's 8 minutes."
            if result["quick"]
            else ""
        ),
        "",
        "| process | RSS start / after warm-up / end MB | growth per 10 min "
        "| first half / second half MB per 10 min | target |",
        "|---|---|---:|---|---|",
    ]
    for name, row in result["rss"].items():
        if "percent_per_10_min" not in row:
            lines.append(f"| {name} | too few samples | | | |")
            continue
        if result["quick"]:
            met = "not judged"
        elif row["percent_per_10_min"] < GOAL_PERCENT_PER_10_MIN:
            met = "met"
        else:
            met = "**not met**"
        lines.append(
            f"| {name} | {row['rss_start_mb']} / {row['rss_after_warmup_mb']} / "
            f"{row['rss_end_mb']} | {row['percent_per_10_min']}% "
            f"({row['mb_per_10_min']:+.2f} MB) | {row['first_half_mb_per_10_min']:+.2f} / "
            f"{row['second_half_mb_per_10_min']:+.2f} | {met} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.duration_s:g} s of load")
    parser.add_argument("--duration", type=float, help="seconds of mixed load")
    parser.add_argument("--warmup", type=float, help="seconds left out of the RSS growth")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.duration is not None:
        plan = Plan(args.duration, plan.warmup_s, plan.sample_every_s, plan.capacity_s)
    if args.warmup is not None:
        plan = Plan(plan.duration_s, args.warmup, plan.sample_every_s, plan.capacity_s)
    result = run(plan)
    result.update(
        benchmark="soak",
        quick=args.quick,
        machine=machine(),
        plan=plan.__dict__,
        mix=dict(MIX),
        load=LOAD,
        cancel_fraction=CANCEL_FRACTION,
        seed=SEED,
    )
    result["summary_markdown"] = report(result)
    path = write_result("soak", result)
    print(result["summary_markdown"])
    print(f"written {path}")


if __name__ == "__main__":
    main()
