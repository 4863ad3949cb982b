"""The broker's ``AgentSnapshot`` record: what ``Broker.agent_snapshots`` builds, the
map it travels as, and Paddler's JSON the HTTP layer makes of it."""

from __future__ import annotations

import dataclasses

import pytest

from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker, Target
from paddler.errors import ProtocolError
from paddler.http.agents_json import agents_body, paddler_agent
from paddler.protocol.codec import decode, encode
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind
from paddler.protocol.messages import AgentSnapshot, AgentStatus

FULL = AgentSnapshot(
    id="agent-x",
    name="a1",
    slots_total=4,
    slots_processing=1,
    desired_slots_total=6,
    model_path="/m.gguf",
    issues=[{"ModelFileDoesNotExist": {"model_path": "/m.gguf"}}],
    state_application_status="AttemptedAndRetrying",
    uses_chat_template_override=True,
    download_current=10,
    download_total=100,
    download_filename="m.gguf",
    ready=True,
)


def test_a_snapshot_is_the_agent_status_with_what_the_broker_knows() -> None:
    assert isinstance(FULL, AgentStatus)
    extra = set(AgentSnapshot.SPEC) - set(AgentStatus.SPEC)
    assert extra == {"id", "name", "slots_processing", "key_fingerprint"}


def test_the_body_round_trips_and_keeps_its_keys() -> None:
    body = FULL.to_body()
    assert set(body) == {f.name for f in dataclasses.fields(AgentSnapshot)}
    assert AgentSnapshot.from_body(body) == FULL
    # a newer broker may add keys; a client ignores them
    assert AgentSnapshot.from_body({**body, "download_indeterminate": False}) == FULL


def test_only_identity_and_slots_are_required() -> None:
    minimal = AgentSnapshot.from_body(
        {"id": "x", "name": None, "slots_total": 2, "slots_processing": 0}
    )
    assert minimal == AgentSnapshot(id="x", name=None, slots_total=2, slots_processing=0)
    assert (minimal.ready, minimal.issues, minimal.state_application_status) == (
        False,
        [],
        "Fresh",
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", None), ("slots_total", "4"), ("ready", 1), ("issues", {}), ("slots_processing", True)],
)
def test_a_wrong_type_is_a_protocol_error(field: str, value: object) -> None:
    with pytest.raises(ProtocolError, match=field):
        AgentSnapshot.from_body({**FULL.to_body(), field: value})
    with pytest.raises(ProtocolError):
        AgentSnapshot.from_body([])


def test_paddlers_json_derives_two_fields() -> None:
    assert paddler_agent(FULL) == {
        "id": "agent-x",
        "name": "a1",
        "slots_total": 4,
        "slots_processing": 1,
        "desired_slots_total": 6,
        "model_path": "/m.gguf",
        "issues": [{"ModelFileDoesNotExist": {"model_path": "/m.gguf"}}],
        "state_application_status": "AttemptedAndRetrying",
        "uses_chat_template_override": True,
        "download_current": 10,
        "download_total": 100,
        "download_filename": "m.gguf",
        "download_indeterminate": False,
    }
    unsaid = dataclasses.replace(FULL, desired_slots_total=0, download_total=0)
    assert paddler_agent(unsaid)["desired_slots_total"] == 4
    assert paddler_agent(unsaid)["download_indeterminate"] is True
    assert agents_body([]) == {"agents": []}


def _register(broker: Broker, identity: bytes, name: str | None, status: dict) -> None:
    frames = encode(Kind.REGISTER, 0, {"version": PROTOCOL_VERSION, "name": name, "status": status})
    broker.on_agent_message(identity, frames, 0.0)


def test_the_broker_answers_get_agents_with_snapshot_bodies_by_name() -> None:
    broker = Broker(BrokerSettings())
    _register(broker, b"agent-b", "zed", {"slots_total": 2, "ready": True, "model_path": "/z"})
    _register(
        broker,
        b"agent-a",
        "alpha",
        {"slots_total": 3, "desired_slots_total": 5, "issues": ["Broken"], "download_total": 9},
    )
    _register(broker, b"agent-c", None, {"slots_total": 1})
    assert [s.id for s in broker.agent_snapshots()] == ["agent-c", "agent-a", "agent-b"]
    broker.outbox.clear()

    broker.on_client_message(b"client", encode(Kind.GET_AGENTS, 7, {}), 0.0)
    [(target, identity, frames)] = broker.outbox
    kind, request_id, body = decode(frames)
    assert (target, identity, kind, request_id) == (Target.CLIENTS, b"client", Kind.AGENTS, 7)
    by_id = {agent["id"]: agent for agent in body["agents"]}
    assert by_id["agent-a"] == {
        "id": "agent-a",
        "name": "alpha",
        "slots_total": 3,
        "slots_processing": 0,
        "desired_slots_total": 5,
        "model_path": None,
        "issues": ["Broken"],
        "state_application_status": "Fresh",
        "uses_chat_template_override": False,
        "download_current": 0,
        "download_total": 9,
        "download_filename": None,
        "ready": False,
        "key_fingerprint": None,  # no curve in this test
    }
    assert by_id["agent-b"]["ready"] is True and by_id["agent-b"]["model_path"] == "/z"
    assert [AgentSnapshot.from_body(a) for a in body["agents"]] == broker.agent_snapshots()

    broker.outbox.clear()
    broker.on_client_message(b"client", encode(Kind.GET_METRICS, 8, {}), 0.0)
    [(_, _, frames)] = broker.outbox
    _, _, body = decode(frames)
    assert [AgentSnapshot.from_body(a) for a in body["agents"]] == broker.agent_snapshots()
    assert body["buffered"] == 0
