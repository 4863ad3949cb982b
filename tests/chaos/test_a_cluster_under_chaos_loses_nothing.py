"""Chaos: a balancer and three llama.cpp agents on the tiny model serve 200 greedy
requests of every kind (native NDJSON, WebSocket, OpenAI SSE; about one in ten
cancelled by its client mid-stream; more while the driver is still at work) while a
driver SIGKILLs an agent, SIGSTOPs another and later SIGCONTs it, starts a fresh one,
and restarts the balancer once.

At the end: every request ended with ``Done`` (its text exactly its greedy
reference, streams that moved to another agent included) or a documented error,
and errors only while the balancer itself was restarting (the connection drops,
or 503 ``ShuttingDown``: clients retry a refused connection, as real ones do, and
only then); streams of the SIGKILLed agent continued on another (the kill is tried
again on another agent, at most three times, until one does);
none hung past its deadline; streams did move between agents; every slot is free
again; no process is left behind. About 30 s on 2 cores."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect

from paddler.testing.cluster import LocalCluster, free_port, wait_until
from paddler.testing.processes import live_processes
from paddler.testing.tiny_model import write_tiny_llama

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

REQUESTS = 200
MAX_REQUESTS = 600
"""Clients go on past ``REQUESTS`` while the driver works, up to this many."""
CONCURRENCY = 10
DEADLINE_S = 60.0
"""No request may take longer (the balancer's restart included)."""
KINDS = ("ndjson", "websocket", "sse")
PROMPTS = ("Once upon a time", "The balancer said", "Write about the sea", "Seven cats")
MAX_TOKENS = (60, 120, 200)


@dataclass
class Outcome:
    index: int
    kind: str
    prompt: str
    max_tokens: int
    cancel_after: int | None
    text: str = ""
    end: str = ""
    """``done``, ``cancelled``, ``error <code> <kind>`` or ``dropped <why>``."""
    agents: list[str] = field(default_factory=list)
    """The agents named by the stream (NDJSON and WebSocket), in order."""
    started: float = 0.0
    ended: float = 0.0
    retries: int = 0
    """Times the client tried again (the balancer refused it while restarting)."""
    retried_at: list[float] = field(default_factory=list)
    """When, and why, each retry (all of them must fall in the balancer's restart)."""
    refusals: list[str] = field(default_factory=list)


def _conversation(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


class Chaos:
    def __init__(self, cluster: LocalCluster, model: Path) -> None:
        self.cluster = cluster
        self.model = model
        self.started_agents = 0
        self.restart_window: tuple[float, float] | None = None
        self.pids: set[int] = set()
        self.done = 0
        self.lock = threading.Lock()
        self.log: list[str] = []
        self.live: dict[int, Outcome] = {}
        """Requests in progress (their ``agents`` and ``text`` say who streams what)."""
        self.continuations = 0.0
        """``paddler_continuations_total`` just before the balancer's restart."""
        self.killed: list[str] = []
        """Agents SIGKILLed while they streamed (the last one's loss moved a stream)."""
        self.kill_continued = 0.0
        """Continuations the last SIGKILL caused (counted by the balancer)."""
        self.references: dict[tuple[str, int], str] = {}
        """Each prompt's whole answer (known before the chaos starts)."""

    # --------------------------------------------------------------- cluster

    def start_agent(self) -> str:
        self.started_agents += 1
        name = f"agent{self.started_agents}"
        process = self.cluster.start_real_agent(name, slots=2)
        self.pids.add(process.pid)
        return name

    def note_descendants(self) -> None:
        """Remember every process under the balancer (gunicorn master and workers)."""
        assert self.cluster.balancer is not None
        roots = {self.cluster.balancer.pid}
        for info in sorted(live_processes(), key=lambda p: p.pid):
            if info.parent in roots:
                roots.add(info.pid)
        self.pids |= roots

    def start_balancer(self) -> None:
        self.cluster.start_balancer()
        self.cluster.wait_for_http(timeout_s=30)
        self.note_descendants()

    def counter(self, name: str) -> float:
        metrics = httpx.get(f"{self.cluster.management_url}/metrics", timeout=5).text
        for line in metrics.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        raise AssertionError(f"{name} is missing from /metrics")

    def agents(self) -> list[dict[str, Any]]:
        url = f"{self.cluster.management_url}/api/v1/agents"
        return list(httpx.get(url, timeout=5).json()["agents"])

    def busy_agent(self, exclude: set[str]) -> str:
        """An agent streaming text to a client right now (so its loss must be
        invisible: the stream continues elsewhere)."""

        def pick() -> str | None:
            # a stream its client read less than a quarter of, on an agent the
            # balancer sees generating: the client may read far behind its agent
            generating = {a["name"] for a in self.agents() if a["slots_processing"]}
            with self.lock:
                streaming = [
                    o.agents[-1]
                    for o in self.live.values()
                    if o.agents
                    and o.text
                    and not o.end
                    and o.agents[-1] not in exclude
                    and o.agents[-1] in generating
                    and len(o.text) * 4 < len(self.references.get((o.prompt, o.max_tokens), ""))
                ]
            return streaming[0] if streaming else None

        return str(wait_until(pick, timeout_s=20, interval_s=0.002, what="a streaming agent"))

    # ---------------------------------------------------------------- driver

    def wait_done(self, count: int) -> None:
        wait_until(lambda: self.done >= count, timeout_s=120, interval_s=0.05, what=f"{count}")

    def drive(self) -> None:
        agents = self.cluster.agents
        self.wait_done(15)
        for attempt in range(3):
            # the victim's streams may all have been generated by the time it dies (a
            # client can read far behind its agent): kill another until one moved on
            before = self.counter("paddler_continuations_total")
            killed = self.busy_agent(set(self.killed))
            agents[killed].signal(signal.SIGSTOP)  # at once: it sends nothing more
            agents[killed].signal(signal.SIGKILL)
            self.killed.append(killed)
            self.log.append(f"SIGKILL {killed}")
            wait_until(
                lambda: killed not in {a["name"] for a in self.agents()},  # noqa: B023
                timeout_s=20,
                what=f"{killed} declared dead",
            )
            self.kill_continued = self.counter("paddler_continuations_total") - before
            if self.kill_continued or attempt == 2:
                break
            self.log.append(f"started {self.start_agent()}")  # three agents again
        self.wait_done(45)
        self.freeze(self.busy_agent(set(self.killed)), meanwhile=self.start_agent)
        for _ in range(2):
            if self.counter("paddler_continuations_total") > self.kill_continued:
                break
            self.freeze(self.busy_agent(set(self.killed)))
        self.wait_done(110)
        self.continuations = self.counter("paddler_continuations_total")
        begin = time.monotonic()
        balancer = self.cluster.balancer
        assert balancer is not None
        balancer.stop(timeout_s=15)
        self.start_balancer()
        wait_until(lambda: len(self.agents()) == 3, timeout_s=20, what="agents back")
        self.restart_window = (begin, time.monotonic() + 1.0)
        self.log.append("balancer restarted")

    def freeze(self, name: str, meanwhile: Callable[[], str] | None = None) -> None:
        """SIGSTOP an agent long enough to be declared dead (its streams move on),
        then SIGCONT it; ``meanwhile``: starts an agent while it is frozen."""
        agent = self.cluster.agents[name]
        agent.signal(signal.SIGSTOP)
        self.log.append(f"SIGSTOP {name}")
        if meanwhile is not None:
            self.log.append(f"started {meanwhile()}")
        time.sleep(3.0)  # declared dead meanwhile: its streams moved on
        agent.signal(signal.SIGCONT)
        self.log.append(f"SIGCONT {name}")

    # -------------------------------------------------------------- requests

    def one(self, outcome: Outcome) -> Outcome:
        """Run one request; like a real client, retry while the balancer refuses
        connections or answers 503 before the stream began (its restart)."""
        outcome.started = time.monotonic()
        with self.lock:
            self.live[outcome.index] = outcome
        while True:
            outcome.text, outcome.end, outcome.agents = "", "", []
            try:
                getattr(self, f"_{outcome.kind}")(outcome)
            except (httpx.HTTPError, WebSocketException, OSError) as exc:
                outcome.end = f"dropped {type(exc).__name__}: {exc}"
            refused = outcome.end.startswith(("dropped Connect", "error 503")) or (
                outcome.end.startswith("dropped") and "refused" in outcome.end.lower()
            )
            if not (refused and not outcome.text):
                break
            if time.monotonic() - outcome.started > DEADLINE_S / 2:
                break
            outcome.retries += 1
            outcome.retried_at.append(time.monotonic())
            outcome.refusals.append(outcome.end[:80])
            time.sleep(0.2)
        outcome.ended = time.monotonic()
        with self.lock:
            self.live.pop(outcome.index, None)
            self.done += 1
        return outcome

    def _token(self, outcome: Outcome, text: str) -> bool:
        """Add text; ``True`` when the client cancels now."""
        outcome.text += text
        if outcome.cancel_after is not None and len(outcome.text) >= outcome.cancel_after:
            outcome.end = "cancelled"
            return True
        return False

    def _ndjson(self, outcome: Outcome) -> None:
        body = {
            "conversation_history": _conversation(outcome.prompt),
            "max_tokens": outcome.max_tokens,
            "temperature": 0.0,
        }
        url = f"{self.cluster.inference_url}/api/v1/continue_from_conversation_history"
        with httpx.stream("POST", url, json=body, timeout=DEADLINE_S) as response:
            if response.status_code != 200:
                outcome.end = f"error {response.status_code} {response.read()[:200]!r}"
                return
            for line in response.iter_lines():
                if not line:
                    continue
                envelope = json.loads(line)
                if "Error" in envelope:
                    error = envelope["Error"]["error"]
                    outcome.end = f"error {error['code']} {error['description']}"
                    return
                self._agent(outcome, envelope["Response"]["generated_by"])
                token = envelope["Response"]["response"]["GeneratedToken"]
                if "ContentToken" in token:
                    if self._token(outcome, token["ContentToken"]):
                        return
                elif "Done" in token:
                    outcome.end = "done"
                else:
                    outcome.end = f"error {token}"
                    return

    @staticmethod
    def _agent(outcome: Outcome, name: str | None) -> None:
        if name and (not outcome.agents or outcome.agents[-1] != name):
            outcome.agents.append(name)

    def _websocket(self, outcome: Outcome) -> None:
        url = self.cluster.inference_url.replace("http://", "ws://") + "/api/v1/inference_socket"
        request = {
            "ContinueFromConversationHistory": {
                "conversation_history": _conversation(outcome.prompt),
                "max_tokens": outcome.max_tokens,
                "temperature": 0.0,
            }
        }
        deadline = outcome.started + DEADLINE_S
        with connect(url, open_timeout=10) as socket:
            socket.send(json.dumps({"Request": {"id": "r", "request": request}}))
            while True:
                message = json.loads(socket.recv(timeout=max(0.1, deadline - time.monotonic())))
                if "Error" in message:
                    error = message["Error"]["error"]
                    outcome.end = f"error {error['code']} {error['description']}"
                    return
                self._agent(outcome, message["Response"]["generated_by"])
                token = message["Response"]["response"]["GeneratedToken"]
                if "ContentToken" in token:
                    if self._token(outcome, token["ContentToken"]):
                        socket.send(json.dumps({"Notification": {"StopRespondingTo": "r"}}))
                        return
                elif "Done" in token:
                    outcome.end = "done"
                    return
                else:
                    outcome.end = f"error {token}"
                    return

    def _sse(self, outcome: Outcome) -> None:
        assert self.cluster.openai_url is not None
        body = {
            "model": "tiny",
            "messages": _conversation(outcome.prompt),
            "max_tokens": outcome.max_tokens,
            "temperature": 0.0,
            "stream": True,
        }
        url = f"{self.cluster.openai_url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=DEADLINE_S) as response:
            if response.status_code != 200:
                outcome.end = f"error {response.status_code} {response.read()[:200]!r}"
                return
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    outcome.end = outcome.end or "dropped no finish_reason"
                    return
                chunk = json.loads(data)
                if "error" in chunk:  # in-band: OpenAI's envelope has no status
                    error = chunk["error"]
                    outcome.end = f"error {error.get('code')} {error.get('message')}"
                    return
                for choice in chunk["choices"]:
                    if self._token(outcome, choice["delta"].get("content") or ""):
                        return
                    if choice.get("finish_reason"):
                        outcome.end = "done"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny.gguf")


@pytest.fixture
def chaos(tmp_path: Path, model: Path) -> Iterator[Chaos]:
    cluster = LocalCluster(
        tmp_path / "cluster",
        compat_openai_addr=f"127.0.0.1:{free_port()}",
        heartbeat_interval=300,
        buffered_request_timeout=30_000,
        max_buffered_requests=REQUESTS,
        state_database=str(tmp_path / "state.sqlite"),
        http_workers=2,
    )
    chaos = Chaos(cluster, model)
    try:
        yield chaos
    finally:
        cluster.close()
    leftover = [info for info in live_processes() if info.pid in chaos.pids]
    assert not leftover, f"processes left behind: {leftover}"


def planned(index: int) -> Outcome:
    """Request ``index`` of the plan: its kind, prompt, length and whether its client
    cancels it (the same for an index whatever the order clients take them in)."""
    rng = random.Random(7 * 1_000_003 + index)
    return Outcome(
        index,
        KINDS[index % len(KINDS)],
        rng.choice(PROMPTS),
        rng.choice(MAX_TOKENS),
        rng.randint(5, 60) if rng.random() < 0.1 else None,
    )


def _references(chaos: Chaos) -> dict[tuple[str, int], str]:
    """Each prompt's greedy answer, one request at a time with nothing else running."""
    references = {}
    for prompt in PROMPTS:
        for max_tokens in MAX_TOKENS:
            outcome = chaos.one(Outcome(-1, "ndjson", prompt, max_tokens, None))
            assert outcome.end == "done", outcome
            references[(prompt, max_tokens)] = outcome.text
    chaos.done = 0
    chaos.references = references
    return references


def test_a_cluster_under_chaos_loses_nothing(chaos: Chaos, model: Path) -> None:
    chaos.start_balancer()
    for _ in range(3):
        chaos.start_agent()
    state = {
        "model": {"LocalToAgent": str(model)},
        "inference_parameters": {"context_size": 1024, "temperature": 0.0},
    }
    put = httpx.put(
        f"{chaos.cluster.management_url}/api/v1/balancer_desired_state", json=state, timeout=10
    )
    assert put.status_code in (200, 204), put.text
    wait_until(
        lambda: (
            len(a := chaos.agents()) == 3
            and all(x["state_application_status"] == "Applied" for x in a)
        ),
        timeout_s=30,
        what="three ready agents",
    )
    references = _references(chaos)
    driver_errors: list[BaseException] = []

    def drive() -> None:
        try:
            chaos.drive()
        except BaseException as exc:  # reported below, with the outcomes
            driver_errors.append(exc)

    driver = threading.Thread(target=drive, name="chaos-driver")
    driver.start()
    # REQUESTS at least, and more while the driver still works (a kill tried again, a
    # slow machine): it always has streams to act on
    indexes = itertools.count()
    outcomes: list[Outcome] = []

    def client() -> None:
        for index in indexes:
            if index >= MAX_REQUESTS or (index >= REQUESTS and not driver.is_alive()):
                return
            outcome = chaos.one(planned(index))
            with chaos.lock:
                outcomes.append(outcome)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for running in [pool.submit(client) for _ in range(CONCURRENCY)]:
            running.result()
    driver.join(timeout=120)
    assert not driver_errors, (driver_errors, chaos.log, len(outcomes))
    assert chaos.restart_window is not None, chaos.log

    summary = Counter(o.end.split(":")[0][:40] for o in outcomes)
    begin, end = chaos.restart_window
    for outcome in outcomes:
        took = outcome.ended - outcome.started
        assert took < DEADLINE_S + 5, (outcome, summary)
        if outcome.end == "done":
            reference = references[(outcome.prompt, outcome.max_tokens)]
            same = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(outcome.text, reference, strict=False))
                    if a != b
                ),
                min(len(outcome.text), len(reference)),
            )
            assert outcome.text == reference, (
                f"request {outcome.index} ({outcome.kind}, agents {outcome.agents}, "
                f"{outcome.retries} retries) differs from its reference at character {same} "
                f"of {len(reference)}",
                chaos.log,
            )
        elif outcome.end == "cancelled":
            reference = references[(outcome.prompt, outcome.max_tokens)]
            assert reference.startswith(outcome.text), outcome
        else:
            # only the balancer's own restart may cost a request
            during_restart = outcome.started <= end and outcome.ended >= begin
            documented = outcome.end.startswith("dropped") or any(
                word in outcome.end for word in ("503", "shutting down", "not answering")
            )
            assert during_restart and documented, (outcome, summary, chaos.log)
    # streams moved off the killed and the frozen agent (the NDJSON and WebSocket
    # ones show it in ``generated_by``), and every one of them ended with its text
    assert chaos.continuations >= 1, (summary, chaos.log)
    # the SIGKILLed agent's streams continued elsewhere (counted by the balancer; the
    # NDJSON and WebSocket ones name both agents), and ended with their whole text
    assert chaos.kill_continued >= 1, (summary, chaos.log)
    from_killed = [o for o in outcomes if any(a in chaos.killed for a in o.agents[:-1])]
    assert all(o.end in ("done", "cancelled") for o in from_killed), from_killed
    # a client retried only while the balancer itself restarted (a refused connection
    # or a 503 anywhere else would be an error the chaos caused)
    for outcome in outcomes:
        for when, why in zip(outcome.retried_at, outcome.refusals, strict=True):
            assert begin <= when <= end, (outcome.index, why, chaos.log)
    moved = [o for o in outcomes if len(o.agents) > 1]
    assert all(o.end in ("done", "cancelled") for o in moved), moved
    assert summary["done"] >= len(outcomes) * 0.8, summary
    # every slot is free again, nothing waits
    wait_until(
        lambda: all(a["slots_processing"] == 0 for a in chaos.agents()),
        timeout_s=20,
        what="every slot free",
    )
    buffered = httpx.get(f"{chaos.cluster.management_url}/api/v1/buffered_requests").json()
    assert buffered == {"buffered_requests_current": 0}
    if os.environ.get("PADDLER_CHAOS_REPORT"):
        retried = sum(1 for o in outcomes if o.retries)
        print(
            summary,
            chaos.log,
            f"{chaos.continuations:.0f} continuations ({len(moved)} seen), {retried} retried",
        )
