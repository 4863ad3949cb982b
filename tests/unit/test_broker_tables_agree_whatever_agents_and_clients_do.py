"""The broker as a state machine, driven without sockets by every peer at every point.

Agents register, report, stream, end, deregister and vanish (as a failed send makes
them vanish) before, during and after dispatch, cancel and done; clients submit,
cancel and get lost; time jumps over heartbeats, buffer deadlines and inter-token
timeouts; garbage arrives. After every step the broker's tables agree with each
other, and every submitted request has at most one outcome (exactly one once the
broker shut down), counted once in ``paddler_requests_total`` and told once to
its client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from paddler.broker.metrics import OTHER_OUTCOME, REQUEST_OUTCOMES
from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker, Target
from paddler.protocol.codec import HEADER, encode, make_header, pack_body, pack_token_ids
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind
from paddler.protocol.prefixes import pack_fingerprints, request_fingerprints

AGENTS = (b"agent-0", b"agent-1")
CLIENTS = (b"client-0", b"client-1")
GARBAGE_CLIENT = b"client-garbage"
NAMES = (None, "box", "shared")
"""Agent names; two agents may share one (their per-agent series share a label)."""
ERROR_KINDS = (
    "Cancelled",
    "AgentUnavailable",
    "AgentEngineRestarted",
    "DecodeFailed",
    "Invented-By-A-Peer",
    7,
)
AGENT_FRAMES = (
    "tokens",
    "tokens with ids",
    "tokens with ids",
    "tokens with bad ids",
    "held prefixes",
    "bad held prefixes",
    "embedding",
    "done",
    "done",
    "error",
    "malformed error",
)
TERMINAL = (int(Kind.DONE), int(Kind.ERROR))


@dataclass
class Submission:
    """One request as its client sees it."""

    withdrawn: bool = False
    """The client cancelled it, or the broker lost the client: no answer is owed."""
    ends: list[int] = field(default_factory=list)
    """Terminal frames (DONE, ERROR) the client received."""
    late: int = 0
    """Frames received after a terminal frame."""


class BrokerMachine(RuleBasedStateMachine):
    slots: ModuleType | None = None
    """The slot bookkeeping under test (compiled or pure Python), set by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.broker = Broker(BrokerSettings())
        self.submitted = 0
        self.submissions: dict[tuple[bytes, int], Submission] = {}
        self.dispatched: list[tuple[bytes, int]] = []
        self.next_client_request_id = 1

    @initialize(
        policy=st.sampled_from(["slots", "round-robin", "prefix"]),
        max_buffered=st.integers(0, 3),
        agents=st.lists(st.sampled_from(AGENTS), unique=True, max_size=len(AGENTS)),
        max_continuations=st.integers(0, 2),
    )
    def start(
        self, policy: str, max_buffered: int, agents: list[bytes], max_continuations: int
    ) -> None:
        self.broker.store.close()
        self.broker = Broker(
            BrokerSettings(
                max_buffered_requests=max_buffered,
                buffered_request_timeout=4000,
                inference_item_timeout=3000,
                heartbeat_interval=1000,
                dispatch_policy=policy,
                max_continuations=max_continuations,
            )
        )
        slots = type(self).slots
        assert slots is not None
        self.broker.registry = slots.Registry()
        self.broker.buffer = slots.RequestBuffer(max_buffered)
        self.broker.in_flight = slots.InFlight()
        for agent in agents:
            self.register(agent, 2, True, None)

    # ------------------------------------------------------------ helpers

    def _read_outbox(self) -> None:
        """What the broker sent: dispatches to agents, answers to clients."""
        for target, identity, frames in self.broker.outbox:
            kind, request_id = HEADER.unpack(frames[0])
            if target is Target.AGENTS:
                if kind == Kind.DISPATCH:
                    self.dispatched.append((identity, request_id))
                continue
            submission = self.submissions.get((identity, request_id))
            if submission is None:
                continue
            if submission.ends:
                submission.late += 1
            if kind in TERMINAL:
                submission.ends.append(kind)
        self.broker.outbox.clear()

    def _from_agent(self, agent: bytes, frames: list[bytes]) -> None:
        self.broker.on_agent_message(agent, frames, self.now)
        self._read_outbox()

    def _from_client(self, client: bytes, frames: list[bytes]) -> None:
        self.broker.on_client_message(client, frames, self.now)
        self._read_outbox()

    def _target(self, data: st.DataObject) -> tuple[bytes, int]:
        """Mostly a request an agent is serving now, else one it was given before
        (perhaps in a former session, perhaps to another agent), or one it never had."""
        live = [
            (agent, request_id)
            for agent, request_id in self.dispatched
            if request_id in self.broker.requests
            and self.broker.requests[request_id].agent == agent
        ]
        choice = data.draw(st.sampled_from(["live", "live", "live", "stale", "never"]))
        if live and choice == "live":
            return data.draw(st.sampled_from(live), label="served now")
        if self.dispatched and choice != "never":
            return data.draw(st.sampled_from(self.dispatched), label="given before")
        return (
            data.draw(st.sampled_from(AGENTS), label="agent"),
            data.draw(st.integers(0, 12), label="request id"),
        )

    # --------------------------------------------------------------- agents

    @rule(
        agent=st.sampled_from(AGENTS),
        slots=st.sampled_from([1, 2, 2, 0]),
        ready=st.sampled_from([True, True, True, False]),
        name=st.sampled_from(NAMES),
    )
    def register(self, agent: bytes, slots: int, ready: bool, name: str | None) -> None:
        status = {"slots_total": slots, "ready": ready}
        body = {"version": PROTOCOL_VERSION, "name": name, "status": status}
        self._from_agent(agent, encode(Kind.REGISTER, 0, body))

    @rule(
        agent=st.sampled_from(AGENTS),
        slots=st.sampled_from([1, 2, 0]),
        ready=st.sampled_from([True, True, False]),
    )
    def report_status(self, agent: bytes, slots: int, ready: bool) -> None:
        self._from_agent(
            agent, encode(Kind.AGENT_STATUS, 0, {"slots_total": slots, "ready": ready})
        )

    @rule(agent=st.sampled_from(AGENTS))
    def heartbeat(self, agent: bytes) -> None:
        self._from_agent(agent, encode(Kind.HEARTBEAT, 0, {}))

    @rule(agent=st.sampled_from(AGENTS), how=st.sampled_from(["deregister", "lost", "gone"]))
    def leave(self, agent: bytes, how: str) -> None:
        """The agent deregisters, or a send to it fails (``BrokerServer._flush`` removes
        it if it is known; ``gone``: ``remove_agent`` is called whatever the agent)."""
        if how == "deregister":
            self._from_agent(agent, encode(Kind.DEREGISTER, 0, {}))
        elif how == "gone" or agent in self.broker.agents:
            self.broker.remove_agent(agent, self.now, reason="became unreachable")
            self._read_outbox()

    @rule(data=st.data(), what=st.sampled_from(AGENT_FRAMES))
    def agent_answers(self, data: st.DataObject, what: str) -> None:
        """Tokens, an end, an error (or a malformed one) about a request the agent was
        given, or was given in a former session, or never had."""
        agent, request_id = self._target(data)
        if what == "tokens":
            frames = [make_header(Kind.TOKENS, request_id), pack_body({"pieces": ["x"]})]
        elif what == "tokens with ids":
            frames = [make_header(Kind.TOKENS, request_id), pack_body(["x"]), pack_token_ids([7])]
        elif what == "tokens with bad ids":
            frames = [make_header(Kind.TOKENS, request_id), pack_body(["x"]), b"\x01"]
        elif what == "held prefixes":
            # what the agent's slots hold now: the prompt the machine submits, or not
            chain = request_fingerprints({"raw_prompt": "x" * 600})
            held = [[0, pack_fingerprints(chain[: data.draw(st.integers(0, 2))])]]
            frames = encode(Kind.SLOT_PREFIXES, 0, {"held": held})
        elif what == "bad held prefixes":
            bad = data.draw(st.sampled_from([{"held": [[99, b""]]}, {"held": [[0, b"x"]]}, {}]))
            frames = encode(Kind.SLOT_PREFIXES, 0, bad)
        elif what == "embedding":
            frames = [make_header(Kind.EMBEDDING, request_id), pack_body({"index": 0})]
        elif what == "done":
            tokens = data.draw(st.sampled_from([0, 3, "many", None]), label="content tokens")
            body = {"usage": {"prompt_tokens": 1, "content_tokens": tokens}}
            frames = encode(Kind.DONE, request_id, body)
        elif what == "malformed error":
            frames = [make_header(Kind.ERROR, request_id), b"\xc1"]
        else:
            kind = data.draw(st.sampled_from(ERROR_KINDS), label="error kind")
            frames = encode(
                Kind.ERROR, request_id, {"code": 500, "kind": kind, "description": "it broke"}
            )
        self._from_agent(agent, frames)

    # -------------------------------------------------------------- clients

    @rule(
        client=st.sampled_from(CLIENTS),
        valid=st.lists(
            st.sampled_from(["yes", "yes", "yes", "invalid", "garbage"]), min_size=1, max_size=3
        ),
    )
    def submit(self, client: bytes, valid: list[str]) -> None:
        for validity in valid:
            client_request_id = self.next_client_request_id
            self.next_client_request_id += 1
            self.submitted += 1
            self.submissions[(client, client_request_id)] = Submission()
            if validity == "garbage":
                body = b"\xc1"
            else:
                max_tokens = 3 if validity == "yes" else -1
                body = pack_body({"raw_prompt": "x" * 600, "max_tokens": max_tokens})
            self._from_client(client, [make_header(Kind.SUBMIT, client_request_id), body])

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        known: bool = data.draw(st.booleans(), label="known request")
        if known and self.submissions:
            client, client_request_id = data.draw(st.sampled_from(sorted(self.submissions)))
        else:
            client = data.draw(st.sampled_from(CLIENTS), label="client")
            client_request_id = data.draw(st.integers(0, 30), label="client request id")
        submission = self.submissions.get((client, client_request_id))
        if submission is not None:
            submission.withdrawn = True
        self._from_client(client, encode(Kind.CANCEL, client_request_id, {}))

    @rule(client=st.sampled_from(CLIENTS))
    def client_lost(self, client: bytes) -> None:
        for (owner, _), submission in self.submissions.items():
            if owner == client:
                submission.withdrawn = True
        self.broker.client_lost(client, self.now)
        self._read_outbox()

    @rule(
        side=st.sampled_from(["agent", "client"]),
        frames=st.lists(st.binary(max_size=12), max_size=3),
    )
    def garbage(self, side: str, frames: list[bytes]) -> None:
        if side == "agent":
            self._from_agent(AGENTS[0], frames)
            return
        # from a client of its own, so that an answer to a frame that happens to be
        # well formed (a query, a cancel) is never taken for one to a submission
        if len(frames) == 2 and len(frames[0]) == 9 and HEADER.unpack(frames[0])[0] == Kind.SUBMIT:
            self.submitted += 1  # a submit (its body cannot be a request): one outcome
        self._from_client(GARBAGE_CLIENT, frames)

    # ----------------------------------------------------------------- time

    @rule(
        seconds=st.sampled_from([0.01, 0.2, 0.5, 0.5, 1.0, 1.6, 2.1, 3.5]),
        silent=st.sampled_from([(), (), (), AGENTS[:1], AGENTS]),
    )
    def tick(self, seconds: float, silent: tuple[bytes, ...]) -> None:
        """Time passes; the agents not ``silent`` send their heartbeats meanwhile."""
        self.now += seconds
        for agent in AGENTS:
            if agent not in silent and agent in self.broker.agents:
                self.broker.on_agent_message(agent, encode(Kind.HEARTBEAT, 0, {}), self.now)
        self.broker.tick(self.now)
        self._read_outbox()

    def shutdown(self) -> None:
        """The balancer stops (its last flush may still remove agents)."""
        self.broker.shutdown()
        self._read_outbox()
        for agent in list(self.broker.agents):
            self.broker.remove_agent(agent, self.now, reason="became unreachable")
        self._read_outbox()
        self._every_submission_has_ended()

    # ----------------------------------------------------------- invariants

    @invariant()
    def tables_agree(self) -> None:
        broker = self.broker
        requests = broker.requests
        in_flight = {
            request_id: agent for agent in AGENTS for request_id in broker.in_flight.of_agent(agent)
        }
        assert len(in_flight) == len(broker.in_flight)
        for request_id, agent in in_flight.items():
            assert request_id in requests, f"request {request_id} in flight but unknown"
            assert requests[request_id].agent == agent
            assert agent in broker.agents, f"request {request_id} in flight on a departed agent"
        assert set(broker.registry.agent_ids()) == set(broker.agents)
        for agent in broker.agents:
            assert broker.registry.in_flight(agent) == broker.in_flight.count_of(agent)
        buffered = broker.buffer.ids()
        assert len(buffered) == len(broker.buffer)
        for request_id in buffered:
            assert request_id in requests, f"request {request_id} buffered but unknown"
            assert request_id not in in_flight
            assert requests[request_id].agent is None
            assert not requests[request_id].cancelled
        continuing = broker.continuing
        for request_id, record in continuing.items():
            assert requests.get(request_id) is record, f"request {request_id} continues unknown"
            assert request_id not in in_flight and request_id not in buffered
            assert record.agent is None and not record.cancelled and record.started
            assert record.continuations <= broker.settings.max_continuations
        assert set(in_flight) | set(buffered) | set(continuing) == set(requests)
        assert len(broker.by_client) == len(requests)
        for request_id, record in requests.items():
            assert broker.by_client[(record.client, record.client_request_id)] == request_id

    @invariant()
    def outcomes_add_up(self) -> None:
        counted = self.broker.metrics.requests
        open_requests = sum(1 for record in self.broker.requests.values() if record.outcome is None)
        assert sum(counted.values()) + open_requests == self.submitted
        for submission in self.submissions.values():
            assert len(submission.ends) <= 1 and submission.late == 0, submission

    @invariant()
    def label_sets_are_bounded(self) -> None:
        metrics = self.broker.metrics
        assert set(metrics.requests) <= REQUEST_OUTCOMES | {OTHER_OUTCOME}
        labels = {info.name or info.agent_id for info in self.broker.agents.values()}
        assert set(metrics.requests_by_agent) <= labels
        assert set(metrics.tokens_by_agent) <= labels

    def _every_submission_has_ended(self) -> None:
        assert not self.broker.requests and not len(self.broker.in_flight)
        assert not len(self.broker.buffer) and not self.broker.by_client
        assert not self.broker.continuing
        assert sum(self.broker.metrics.requests.values()) == self.submitted
        for key, submission in self.submissions.items():
            if not submission.withdrawn:
                assert len(submission.ends) == 1, (key, submission)

    def teardown(self) -> None:
        try:
            self.shutdown()
        finally:
            self.broker.store.close()


def _check(slots: ModuleType, **overrides: Any) -> None:
    BrokerMachine.slots = slots
    run_state_machine_as_test(
        BrokerMachine,
        settings=settings(
            max_examples=overrides.get("max_examples", 500),
            stateful_step_count=50,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_tables_agree_and_outcomes_add_up_whatever_peers_do(slots_impl: ModuleType) -> None:
    _check(slots_impl)


def test_a_shutdown_then_a_failed_send_to_a_dead_agent_leaves_nothing_behind() -> None:
    """The crash of issue 10, without sockets: the shutdown forgot the requests but
    left them in the in-flight table and the buffer, then the last flush's failed send
    to the dead agent made ``remove_agent`` look them up (``KeyError``)."""
    broker = Broker(BrokerSettings())
    status = {"slots_total": 1, "ready": True}
    register = {"version": PROTOCOL_VERSION, "name": "doomed", "status": status}
    broker.on_agent_message(AGENTS[0], encode(Kind.REGISTER, 0, register), 0.0)
    for client_request_id in (1, 2):  # one in flight, one buffered
        body = pack_body({"raw_prompt": "x", "max_tokens": 3})
        broker.on_client_message(
            CLIENTS[0], [make_header(Kind.SUBMIT, client_request_id), body], 0.0
        )
    assert (len(broker.in_flight), len(broker.buffer)) == (1, 1)

    broker.shutdown()
    broker.remove_agent(AGENTS[0], 0.1, reason="became unreachable")

    assert (len(broker.in_flight), len(broker.buffer), broker.requests) == (0, 0, {})
    assert broker.metrics.requests == {"ShuttingDown": 2}
