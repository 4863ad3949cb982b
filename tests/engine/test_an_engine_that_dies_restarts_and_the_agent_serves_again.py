"""An exception that escapes the engine loop does not take the agent down: it stays
registered, shows ``EngineFailed`` in the agents list while it reloads its model,
gives the requests it held back with ``AgentEngineRestarted`` (the broker continues
a streamed one where it stopped, here on the same agent once it is back), and
serves again. With continuations off the client gets that error. Too many failures
in a row leave it down (not ready, the issue shown) until a new desired state
arrives.

In one process: a real broker, a real agent service with the llama.cpp engine on
the tiny model, a real client; the fault is a monkeypatched ``LlamaEngine.step``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paddler.agent.llama_engine import LlamaEngine
from paddler.agent.service import AgentService
from paddler.agent.settings import AgentSettings
from paddler.broker.server import BrokerServer
from paddler.broker.settings import BrokerSettings
from paddler.client import Client, Done, Failed, Tokens
from paddler.testing.cluster import free_port, wait_until
from tests.engine.conftest import local_resolver, state_for

PROMPT = "the quick brown fox"


class Faults:
    """Makes ``LlamaEngine.step`` raise: at the ``at``-th call from now, or always."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.countdown = 0
        self.always = False
        self.raised = 0

    def arm(self, at: int) -> None:
        with self.lock:
            self.countdown = at

    def fire(self) -> bool:
        with self.lock:
            if self.always:
                self.raised += 1
                return True
            if self.countdown > 0:
                self.countdown -= 1
                if self.countdown == 0:
                    self.raised += 1
                    return True
            return False


class Agent:
    def __init__(
        self, client: Client, clients_addr: str, service: AgentService, faults: Faults
    ) -> None:
        self.client = client
        self.clients_addr = clients_addr
        self.service = service
        self.faults = faults
        self.reset_gate = threading.Event()
        self.reset_gate.set()

    def one(self) -> dict[str, Any]:
        agents = self.client.agents()
        assert len(agents) == 1, agents  # never gone from the list
        return agents[0]

    def wait_ready(self) -> dict[str, Any]:
        return wait_until(
            lambda: (agent := self.one())["ready"] and not agent["issues"] and agent,
            timeout_s=20,
            what="the agent ready with no issue",
        )

    def generate(self, max_tokens: int = 16, client: Client | None = None) -> tuple[str, Any]:
        """The text of a request and how it ended (``client``: for another thread, as a
        ``Client`` is not thread-safe)."""
        text = ""
        end: Any = None
        client = client or self.client
        for event in client.continue_from_raw_prompt(PROMPT, max_tokens=max_tokens):
            if isinstance(event, Tokens):
                text += "".join(event.pieces)
            elif isinstance(event, Done | Failed):
                end = event
        return text, end


@pytest.fixture
def agent(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Agent]:
    broker_options: dict[str, Any] = getattr(request, "param", {})
    faults = Faults()
    real_step = LlamaEngine.step
    real_reset = LlamaEngine.reset

    def step(self: LlamaEngine, sink: Any) -> None:
        if faults.fire():
            raise RuntimeError("an injected bug in step")
        real_step(self, sink)

    def reset(self: LlamaEngine, state: Any) -> None:
        assert harness.reset_gate.wait(20)
        real_reset(self, state)

    monkeypatch.setattr(LlamaEngine, "step", step)
    monkeypatch.setattr(LlamaEngine, "reset", reset)
    switch_interval = sys.getswitchinterval()
    agents_addr = f"tcp://127.0.0.1:{free_port()}"
    clients_addr = f"tcp://127.0.0.1:{free_port()}"
    servers: list[BrokerServer] = []

    def run_broker() -> None:  # built here: its SQLite store belongs to this thread
        servers.append(
            BrokerServer(
                BrokerSettings(agents_addr=agents_addr, clients_addr=clients_addr, **broker_options)
            )
        )
        servers[0].run()

    broker_thread = threading.Thread(target=run_broker, name="broker", daemon=True)
    broker_thread.start()
    wait_until(lambda: servers, timeout_s=10, what="the broker bound")
    engine = LlamaEngine(2, n_threads=1, resolver=local_resolver)
    service = AgentService(AgentSettings(broker_addr=agents_addr, slots=2, name="fragile"), engine)
    agent_thread = threading.Thread(target=service.run, name="agent", daemon=True)
    agent_thread.start()
    client = Client(clients_addr, timeout_s=10)
    harness = Agent(client, clients_addr, service, faults)
    try:
        wait_until(lambda: len(client.agents()) == 1, timeout_s=10, what="the agent registered")
        client.put_desired_state(state_for(tiny_model))
        harness.wait_ready()
        yield harness
    finally:
        harness.reset_gate.set()
        faults.always = False
        client.close()
        service.stop()
        agent_thread.join(timeout=15)
        servers[0].stop()
        broker_thread.join(timeout=15)
        sys.setswitchinterval(switch_interval)
        assert not agent_thread.is_alive() and not broker_thread.is_alive()
    assert service.exit_code == 0


def test_the_agent_reports_the_failure_reloads_and_continues_the_stream(agent: Agent) -> None:
    reference, end = agent.generate(max_tokens=200)
    assert isinstance(end, Done) and reference
    agent.reset_gate.clear()  # hold the reload to see the agent while it recovers
    agent.faults.arm(at=3)  # prefill, first token, then the bug
    outcome: list[tuple[str, Any]] = []

    def stream() -> None:  # a client of its own: the main thread queries with the other
        with Client(agent.clients_addr, timeout_s=10) as client:
            outcome.append(agent.generate(max_tokens=200, client=client))

    streaming = threading.Thread(target=stream)
    streaming.start()
    recovering = wait_until(
        lambda: (a := agent.one())["issues"] and a, timeout_s=10, what="an issue shown"
    )
    assert not recovering["ready"]
    assert recovering["issues"] == [
        {"EngineFailed": {"error": "RuntimeError: an injected bug in step", "restarting": True}}
    ]
    agent.reset_gate.set()
    streaming.join(timeout=30)
    ((text, end),) = outcome
    assert isinstance(end, Done), end
    assert text == reference  # continued where it stopped, nothing lost or repeated
    agent.wait_ready()
    again, end = agent.generate(max_tokens=200)
    assert isinstance(end, Done) and again == reference
    assert agent.service.worker.restarts == 1
    assert agent.service.worker.is_alive()


@pytest.mark.parametrize("agent", [{"max_continuations": 0}], indirect=True)
def test_with_continuations_off_the_client_gets_the_engine_restart(agent: Agent) -> None:
    reference, _ = agent.generate(max_tokens=200)
    agent.faults.arm(at=3)
    text, end = agent.generate(max_tokens=200)
    assert isinstance(end, Failed), end
    assert (end.code, end.kind) == (503, "AgentEngineRestarted")
    assert "RuntimeError: an injected bug in step" in end.description
    assert text and reference.startswith(text)  # what came before the fault was right
    agent.wait_ready()


@pytest.mark.parametrize("agent", [{"max_continuations": 0}], indirect=True)
def test_after_too_many_failures_the_agent_stays_down_until_a_new_desired_state(
    agent: Agent, tiny_model: Path
) -> None:
    agent.service.worker.max_restarts = 1
    agent.faults.always = True
    _, end = agent.generate()
    assert isinstance(end, Failed) and end.kind == "AgentEngineRestarted"
    agent.wait_ready()  # the first failure: restarted
    stream = agent.client.continue_from_raw_prompt(PROMPT, max_tokens=16)
    events = list(stream)
    assert isinstance(events[-1], Failed) and events[-1].kind == "AgentEngineRestarted"
    down = wait_until(
        lambda: (a := agent.one())["issues"] and a, timeout_s=10, what="the agent down"
    )
    assert not down["ready"]
    assert down["issues"] == [
        {"EngineFailed": {"error": "RuntimeError: an injected bug in step", "restarting": False}}
    ]
    assert agent.faults.raised == 2
    assert agent.service.worker.restarts == 1
    # it stays down (and registered) while nothing changes
    assert not agent.one()["ready"] and agent.one()["issues"] == down["issues"]
    agent.faults.always = False
    agent.client.put_desired_state(state_for(tiny_model, context_size=512))
    agent.wait_ready()
    text, end = agent.generate()
    assert isinstance(end, Done) and text
    assert agent.service.worker.restarts == 2


def test_a_desired_state_whose_application_raises_restarts_the_engine_with_it(
    agent: Agent, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_apply = LlamaEngine.apply_state
    calls = {"n": 0}

    def apply_state(self: LlamaEngine, state: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("an injected failure while swapping")
        real_apply(self, state)

    monkeypatch.setattr(LlamaEngine, "apply_state", apply_state)
    agent.client.put_desired_state(state_for(tiny_model, context_size=512))
    wait_until(lambda: agent.service.worker.restarts == 1, timeout_s=10, what="a restart")
    agent.wait_ready()
    assert calls["n"] == 2  # the restart applied the new state
    engine = agent.service.engine
    assert isinstance(engine, LlamaEngine) and engine.n_ctx_seq == 512
    text, end = agent.generate()
    assert isinstance(end, Done) and text
