"""``paddler_requests_total``: every submitted request ends in exactly one outcome,
whatever ends it (its client, its agent, the broker, or several of them in turn);
outcomes take only documented values, and a departed agent's series leave with it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from paddler.agent import engine
from paddler.broker.metrics import OTHER_OUTCOME, REQUEST_OUTCOMES, BrokerMetrics
from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker
from paddler.http.metrics import render_metrics
from paddler.protocol.codec import decode, encode, make_header, pack_body
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind

CLIENT = b"client"


def _broker(**settings: Any) -> Broker:
    return Broker(BrokerSettings(**settings))


def _register(broker: Broker, agent: bytes, name: str | None, slots: int = 1) -> None:
    status = {"slots_total": slots, "ready": True}
    body = {"version": PROTOCOL_VERSION, "name": name, "status": status}
    broker.on_agent_message(agent, encode(Kind.REGISTER, 0, body), 0.0)


def _submit(
    broker: Broker, client_request_id: int, now: float = 0.0, count_only: bool = False
) -> None:
    body = pack_body({"raw_prompt": "x", "max_tokens": 3, "count_only": count_only})
    broker.on_client_message(CLIENT, [make_header(Kind.SUBMIT, client_request_id), body], now)


def _cancel(broker: Broker, client_request_id: int, now: float = 0.0) -> None:
    broker.on_client_message(CLIENT, encode(Kind.CANCEL, client_request_id, {}), now)


def _dispatched(broker: Broker) -> list[tuple[bytes, int]]:
    """(agent, request id) of every DISPATCH in the outbox, which is emptied."""
    sent = [
        (identity, decode(frames)[1])
        for _, identity, frames in broker.outbox
        if decode(frames)[0] == Kind.DISPATCH
    ]
    broker.outbox.clear()
    return sent


def _agent_error(broker: Broker, agent: bytes, request_id: int, kind: str, now: float) -> None:
    body = {"code": 500, "kind": kind, "description": "it broke"}
    broker.on_agent_message(agent, encode(Kind.ERROR, request_id, body), now)


def _agent_done(broker: Broker, agent: bytes, request_id: int, tokens: int = 3) -> None:
    body = {"usage": {"content_tokens": tokens}}
    broker.on_agent_message(agent, encode(Kind.DONE, request_id, body), 0.0)


def test_a_prompt_counted_is_counted_apart_from_the_answers() -> None:
    """``count_only`` requests (the Responses and Messages APIs' token counts) end as
    ``counted``, so ``done`` stays the answers given."""
    broker = _broker()
    _register(broker, b"a", "a", slots=2)
    _submit(broker, 1, count_only=True)
    _submit(broker, 2)
    for agent, request_id in _dispatched(broker):
        _agent_done(broker, agent, request_id, tokens=0)
    assert broker.metrics.requests == {"counted": 1, "done": 1}
    _submit(broker, 3, count_only=True)
    _cancel(broker, 3)
    assert broker.metrics.requests == {"counted": 1, "done": 1, "cancelled": 1}
    exposed = render_metrics({"metrics": broker.metrics.snapshot(), "agents": [], "buffered": 0})
    assert 'paddler_requests_total{outcome="counted"} 1.0' in exposed


def test_a_request_cancelled_while_buffered_is_counted_cancelled() -> None:
    broker = _broker()
    _submit(broker, 1)
    _cancel(broker, 1)
    assert broker.metrics.requests == {"cancelled": 1}
    assert not len(broker.buffer) and not broker.requests


def test_requests_of_a_lost_client_are_counted_cancelled_wherever_they_were() -> None:
    broker = _broker()
    _register(broker, b"a", "a", slots=1)
    _submit(broker, 1)  # in flight
    _submit(broker, 2)  # buffered
    broker.client_lost(CLIENT, 0.0)
    assert broker.metrics.requests == {"cancelled": 2}


def test_a_cancel_and_then_the_agents_end_count_once() -> None:
    broker = _broker()
    _register(broker, b"a", "a")
    _submit(broker, 1)
    [(agent, request_id)] = _dispatched(broker)
    _cancel(broker, 1)
    _agent_error(broker, agent, request_id, "Cancelled", 0.1)
    assert broker.metrics.requests == {"cancelled": 1}
    assert broker.metrics.requests_by_agent == {"a": 1}  # the agent ended it all the same
    assert broker.registry.in_flight(b"a") == 0


def test_a_timed_out_request_then_the_agents_end_count_once() -> None:
    broker = _broker(inference_item_timeout=1000)
    _register(broker, b"a", "a")
    _submit(broker, 1)
    [(agent, request_id)] = _dispatched(broker)
    broker.on_agent_message(agent, encode(Kind.HEARTBEAT, 0, {}), 1.5)
    broker.tick(1.5)
    _agent_done(broker, agent, request_id)
    assert broker.metrics.requests == {"InferenceItemTimeout": 1}


def test_a_request_whose_agent_never_confirms_the_cancel_is_counted_once() -> None:
    broker = _broker(inference_item_timeout=1000, heartbeat_interval=10_000)
    _register(broker, b"a", "a")
    _submit(broker, 1)
    _cancel(broker, 1, now=0.5)
    broker.tick(2.0)  # the slot is given back
    assert broker.metrics.requests == {"cancelled": 1} and not broker.requests


@pytest.mark.parametrize(
    ("sent", "counted"),
    [
        ("GrammarSyntaxError", "GrammarSyntaxError"),
        ("KvCacheExhausted", "KvCacheExhausted"),
        ("a kind no one documented", OTHER_OUTCOME),
        ("x" * 10_000, OTHER_OUTCOME),
    ],
)
def test_error_kinds_from_agents_count_as_documented_outcomes_or_other(
    sent: str, counted: str
) -> None:
    broker = _broker()
    _register(broker, b"a", "a")
    _submit(broker, 1)
    [(agent, request_id)] = _dispatched(broker)
    _agent_error(broker, agent, request_id, sent, 0.1)
    assert broker.metrics.requests == {counted: 1}
    # the client still reads the agent's own kind
    [(_, _, frames)] = broker.outbox
    assert decode(frames)[2]["kind"] == sent


_KIND_IN_A_CALL = re.compile(
    r"(?:sink\.error|_report_fault|_fail_all|ErrorBody|GrammarError)\("
    r"(?:[^()]|\([^()]*\))*?\"([A-Z][A-Za-z]+)\"",
    re.S,
)


def test_every_kind_an_agent_ends_a_request_with_is_a_documented_outcome() -> None:
    """The kinds ``paddler.agent.engine`` documents, and those paddler/agent passes
    to ``sink.error`` and its kin: a new one must join ``REQUEST_OUTCOMES``, or it
    would count as ``other``."""
    documented = set(re.findall(r"^- ``([A-Za-z]+)`` \(\d+\)", engine.__doc__ or "", re.M))
    assert {"SamplerError", "DetokenizationFailed", "EngineFault"} <= documented
    agent_sources = Path(engine.__file__).parent.rglob("*.py")
    sent = {kind for path in agent_sources for kind in _KIND_IN_A_CALL.findall(path.read_text())}
    assert {"Cancelled", "GrammarSyntaxError", "PromptTooLong"} <= sent
    assert documented | sent <= REQUEST_OUTCOMES


def test_the_outcome_set_is_documented_and_holds_the_kinds_paddler_sends() -> None:
    assert {"done", "cancelled", "BufferOverflow", "AgentLost", "ShuttingDown"} <= (
        REQUEST_OUTCOMES
    )
    assert OTHER_OUTCOME not in REQUEST_OUTCOMES
    metrics = BrokerMetrics()
    for kind in ("done", "NotAKind", 7, None):
        metrics.count_outcome(kind)
    assert metrics.requests == {"done": 1, OTHER_OUTCOME: 3}


def test_a_departed_agents_series_leave_and_a_namesakes_stay() -> None:
    broker = _broker()
    _register(broker, b"one", "shared")
    _register(broker, b"two", "shared")
    _register(broker, b"solo", None)
    for client_request_id in (1, 2, 3):
        _submit(broker, client_request_id)
    for agent, request_id in _dispatched(broker):
        _agent_done(broker, agent, request_id, tokens=4)
    assert broker.metrics.requests_by_agent == {"shared": 2, "solo": 1}
    assert broker.metrics.tokens_by_agent == {"shared": 8, "solo": 4}

    broker.remove_agent(b"one", 1.0, reason="stopped answering")
    broker.on_agent_message(b"solo", encode(Kind.DEREGISTER, 0, {}), 1.0)
    assert broker.metrics.requests_by_agent == {"shared": 2}  # "two" is still "shared"
    broker.remove_agent(b"two", 1.0, reason="became unreachable")
    assert broker.metrics.requests_by_agent == {} and broker.metrics.tokens_by_agent == {}
    assert broker.metrics.requests == {"done": 3}  # outcomes are not per agent: they stay

    exposed = render_metrics({"metrics": broker.metrics.snapshot(), "agents": [], "buffered": 0})
    assert "paddler_agent_requests_total{" not in exposed
    assert 'paddler_requests_total{outcome="done"} 3.0' in exposed
