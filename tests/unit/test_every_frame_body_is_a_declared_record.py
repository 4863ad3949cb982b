"""Every frame body the broker, an agent or a client reads is a declared record
(``paddler.protocol.messages``): ``from_body`` takes a good body (extra keys
ignored), and names the message and the field of a missing field or a wrong type,
``true`` never passing for an int. Where the class name is taken by another public
class, the record states the message name (``DoneBody`` is ``Done``), so the
errors read as they always did."""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paddler.agent.service import AgentService
from paddler.agent.settings import AgentSettings
from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker
from paddler.client.events import Dispatched, Done, Failed, decode_event
from paddler.errors import ProtocolError
from paddler.protocol.codec import HEADER, decode, encode, pack_body
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind
from paddler.protocol.messages import (
    AgentQuery,
    AgentSnapshot,
    AgentStatus,
    DeleteResponse,
    DesiredStateBody,
    DispatchedBody,
    DoneBody,
    ErrorBody,
    GetAgentInfo,
    GetResponse,
    Ping,
    PutDesiredState,
    PutResponse,
    Record,
    Register,
    Registered,
    Usage,
)
from paddler.testing.cluster import free_port
from paddler.testing.fake_engine import FakeEngine

GOOD: list[tuple[type[Record], dict[str, Any], Record]] = [
    (Ping, {"version": 3}, Ping(version=3)),
    (
        PutDesiredState,
        {"state": {"model": {"HuggingFace": {}}}},
        PutDesiredState(state={"model": {"HuggingFace": {}}}),
    ),
    (
        GetAgentInfo,
        {"agent_id": "a1", "what": "model_metadata"},
        GetAgentInfo(agent_id="a1", what="model_metadata"),
    ),
    (PutResponse, {"id": "resp_a", "body": b"{}"}, PutResponse(id="resp_a", body=b"{}")),
    (
        PutResponse,
        {"id": "resp_a", "body": b"{}", "expected": b"[]"},
        PutResponse(id="resp_a", body=b"{}", expected=b"[]"),
    ),
    (
        PutResponse,
        {"id": "resp_a", "body": b"", "expected": None},
        PutResponse(id="resp_a", body=b""),
    ),
    (GetResponse, {"id": "resp_a"}, GetResponse(id="resp_a")),
    (DeleteResponse, {"id": "resp_a"}, DeleteResponse(id="resp_a")),
    (
        DispatchedBody,
        {"agent_id": "a1", "agent_name": "box", "queued_ms": 0},
        DispatchedBody(agent_id="a1", agent_name="box", queued_ms=0),
    ),
    (
        DispatchedBody,
        {"agent_id": "a1", "agent_name": None, "queued_ms": 12},
        DispatchedBody(agent_id="a1", agent_name=None, queued_ms=12),
    ),
    (DoneBody, {"usage": {}}, DoneBody(usage={})),
    (
        DoneBody,
        {"usage": {"prompt_tokens": 2}, "stop_sequence": "END"},
        DoneBody(usage={"prompt_tokens": 2}, stop_sequence="END"),
    ),
    (AgentQuery, {"what": "chat_template_override"}, AgentQuery(what="chat_template_override")),
    (DesiredStateBody, {"state": {"a": [1]}}, DesiredStateBody(state={"a": [1]})),
    (DesiredStateBody, {"state": None}, DesiredStateBody(state=None)),
    (
        Registered,
        {"agent_id": "a1", "heartbeat_interval_ms": 1000},
        Registered(agent_id="a1", heartbeat_interval_ms=1000),
    ),
]

BAD: list[tuple[type[Record], Any, str]] = [
    # missing fields
    (Ping, {}, "Ping: missing field 'version'"),
    (PutDesiredState, {}, "PutDesiredState: missing field 'state'"),
    (GetAgentInfo, {"what": "x"}, "GetAgentInfo: missing field 'agent_id'"),
    (GetAgentInfo, {"agent_id": "a1"}, "GetAgentInfo: missing field 'what'"),
    (PutResponse, {"body": b"x"}, "PUT_RESPONSE: missing field 'id'"),
    (PutResponse, {"id": "resp_a"}, "PUT_RESPONSE: missing field 'body'"),
    (GetResponse, {}, "GET_RESPONSE: missing field 'id'"),
    (DeleteResponse, {"body": b"x"}, "DELETE_RESPONSE: missing field 'id'"),
    (
        DispatchedBody,
        {"agent_name": None, "queued_ms": 1},
        "Dispatched: missing field 'agent_id'",
    ),
    (DispatchedBody, {"agent_id": "a1", "queued_ms": 1}, "Dispatched: missing field 'agent_name'"),
    (
        DispatchedBody,
        {"agent_id": "a1", "agent_name": None},
        "Dispatched: missing field 'queued_ms'",
    ),
    (DoneBody, {"stop_sequence": None}, "Done: missing field 'usage'"),
    (AgentQuery, {}, "AgentQuery: missing field 'what'"),
    (DesiredStateBody, {}, "DesiredState: missing field 'state'"),
    (Registered, {"agent_id": "a1"}, "Registered: missing field 'heartbeat_interval_ms'"),
    # wrong types
    (Ping, {"version": "3"}, "Ping.version: expected int, got str"),
    (Ping, {"version": 3.0}, "Ping.version: expected int, got float"),
    (Ping, {"version": None}, "Ping.version: expected int, got NoneType"),
    (PutDesiredState, {"state": None}, "PutDesiredState.state: expected dict, got NoneType"),
    (PutDesiredState, {"state": [1]}, "PutDesiredState.state: expected dict, got list"),
    (GetAgentInfo, {"agent_id": 1, "what": "x"}, "GetAgentInfo.agent_id: expected str, got int"),
    (GetAgentInfo, {"agent_id": "a1", "what": b"x"}, "GetAgentInfo.what: expected str, got bytes"),
    (PutResponse, {"id": 3, "body": b"x"}, "PUT_RESPONSE.id: expected str, got int"),
    (PutResponse, {"id": "r", "body": "x"}, "PUT_RESPONSE.body: expected bytes, got str"),
    (
        PutResponse,
        {"id": "r", "body": b"x", "expected": "x"},
        "PUT_RESPONSE.expected: expected bytes or null, got str",
    ),
    (GetResponse, {"id": None}, "GET_RESPONSE.id: expected str, got NoneType"),
    (DeleteResponse, {"id": b"resp_a"}, "DELETE_RESPONSE.id: expected str, got bytes"),
    (
        DispatchedBody,
        {"agent_id": "a1", "agent_name": 7, "queued_ms": 1},
        "Dispatched.agent_name: expected str or null, got int",
    ),
    (
        DispatchedBody,
        {"agent_id": "a1", "agent_name": None, "queued_ms": "1"},
        "Dispatched.queued_ms: expected int, got str",
    ),
    (DoneBody, {"usage": [1]}, "Done.usage: expected dict, got list"),
    (
        DoneBody,
        {"usage": {}, "stop_sequence": 1},
        "Done.stop_sequence: expected str or null, got int",
    ),
    (AgentQuery, {"what": None}, "AgentQuery.what: expected str, got NoneType"),
    (DesiredStateBody, {"state": "x"}, "DesiredState.state: expected dict or null, got str"),
    (
        Registered,
        {"agent_id": "a1", "heartbeat_interval_ms": 1.5},
        "Registered.heartbeat_interval_ms: expected int, got float",
    ),
    # a bool is never an int
    (Ping, {"version": True}, "Ping.version: expected int, got bool"),
    (
        DispatchedBody,
        {"agent_id": "a1", "agent_name": None, "queued_ms": False},
        "Dispatched.queued_ms: expected int, got bool",
    ),
    (
        Registered,
        {"agent_id": "a1", "heartbeat_interval_ms": True},
        "Registered.heartbeat_interval_ms: expected int, got bool",
    ),
    # not a map
    (Ping, [3], "Ping: body must be a map, got list"),
    (PutResponse, b"x", "PUT_RESPONSE: body must be a map, got bytes"),
    (DoneBody, None, "Done: body must be a map, got NoneType"),
    (DispatchedBody, "a1", "Dispatched: body must be a map, got str"),
    (DesiredStateBody, None, "DesiredState: body must be a map, got NoneType"),
]

NEW_RECORDS: list[type[Record]] = [
    Ping,
    PutDesiredState,
    GetAgentInfo,
    PutResponse,
    GetResponse,
    DeleteResponse,
    DispatchedBody,
    DoneBody,
    AgentQuery,
    DesiredStateBody,
]


@pytest.mark.parametrize(("record", "body", "expected"), GOOD, ids=repr)
def test_a_good_body_is_read_and_extra_keys_are_ignored(
    record: type[Record], body: dict[str, Any], expected: Record
) -> None:
    assert record.from_body(body) == expected
    assert record.from_body({**body, "added_by_a_newer_peer": [1, {"x": True}]}) == expected


@pytest.mark.parametrize(("record", "body", "message"), BAD, ids=repr)
def test_a_bad_body_names_the_message_and_the_field(
    record: type[Record], body: Any, message: str
) -> None:
    with pytest.raises(ProtocolError) as exc_info:
        record.from_body(body)
    assert str(exc_info.value) == message


def test_a_record_is_named_after_its_class_unless_it_states_a_name() -> None:
    plain: list[type[Record]] = [Ping, PutDesiredState, GetAgentInfo, AgentQuery, Registered]
    plain += [Register, AgentStatus, AgentSnapshot, ErrorBody, Usage]  # a subclass too
    assert [r.__name__ for r in plain] == [r.NAME for r in plain]
    named: dict[type[Record], str] = {
        DoneBody: "Done",
        DispatchedBody: "Dispatched",
        DesiredStateBody: "DesiredState",
        PutResponse: Kind.PUT_RESPONSE.name,
        GetResponse: Kind.GET_RESPONSE.name,
        DeleteResponse: Kind.DELETE_RESPONSE.name,
    }
    assert named == {r: r.NAME for r in named}


@settings(max_examples=200, deadline=None)
@given(data=st.data(), record=st.sampled_from(NEW_RECORDS))
def test_any_body_is_read_or_raises_only_protocol_error(
    data: st.DataObject, record: type[Record]
) -> None:
    values = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    )
    keys = st.one_of(st.sampled_from(sorted(record.SPEC)), st.text(max_size=6))
    body = data.draw(st.one_of(values, st.dictionaries(keys, values, max_size=6)))
    try:
        result = record.from_body(body)
    except ProtocolError as exc:
        assert str(exc).startswith(record.NAME)
        return
    for name, types in record.SPEC.items():
        value = getattr(result, name)
        assert isinstance(value, types)
        assert bool in types or not isinstance(value, bool)


# ------------------------------------------------- the client's events, end to end


def test_the_client_reads_dispatched_and_done() -> None:
    body = {"agent_id": "a1", "agent_name": None, "queued_ms": 4, "later": 1}
    assert decode_event(Kind.DISPATCHED, pack_body(body)) == Dispatched("a1", None, 4)
    done = decode_event(Kind.DONE, pack_body({"usage": {"prompt_tokens": 2}, "stop_sequence": "x"}))
    assert done == Done(Usage(prompt_tokens=2), "x")
    assert decode_event(Kind.DONE, pack_body({"usage": {}})) == Done(Usage(), None)


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        (
            Kind.DISPATCHED,
            {"agent_id": "a1", "agent_name": None, "queued_ms": True},
            "Dispatched.queued_ms: expected int, got bool",
        ),
        (Kind.DISPATCHED, {"agent_id": "a1", "queued_ms": 1}, "Dispatched: missing field"),
        (Kind.DONE, {}, "Done: missing field 'usage'"),
        (Kind.DONE, {"usage": 3}, "Done.usage: expected dict, got int"),
        (
            Kind.DONE,
            {"usage": {"prompt_tokens": True}},
            "Usage.prompt_tokens: expected int, got bool",
        ),
        (Kind.DONE, {"usage": {}, "stop_sequence": 1}, "Done.stop_sequence"),
    ],
    ids=repr,
)
def test_a_malformed_dispatched_or_done_is_a_502_naming_the_field(
    kind: Kind, body: Any, message: str
) -> None:
    event = decode_event(kind, pack_body(body))
    assert isinstance(event, Failed)
    assert (event.code, event.kind) == (502, "ProtocolError")
    assert message in event.description


# --------------------------------------------- the broker's answers to a client


def _ask(body: Any, kind: Kind) -> tuple[int, Any]:
    broker = Broker(BrokerSettings())
    frames = [HEADER.pack(kind, 7), msgpack.packb(body)]
    broker.on_client_message(b"client", frames, 0.0)
    [(_, identity, answer)] = broker.outbox
    answered_kind, answered_id, answered = decode(answer)
    assert (identity, answered_id) == (b"client", 7)
    broker.responses.close()
    return answered_kind, answered


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        (Kind.PING, {"version": True}, "Ping.version: expected int, got bool"),
        (Kind.PING, {}, "Ping: missing field 'version'"),
        (Kind.PUT_DESIRED_STATE, {"state": []}, "PutDesiredState.state: expected dict, got list"),
        (Kind.GET_AGENT_INFO, {"agent_id": "a1"}, "GetAgentInfo: missing field 'what'"),
        (Kind.PUT_RESPONSE, {"id": "r", "body": "x"}, "PUT_RESPONSE.body: expected bytes, got str"),
        (Kind.PUT_RESPONSE, {"id": "", "body": b"x"}, "PUT_RESPONSE: id must be 1 to"),
        (Kind.GET_RESPONSE, {"id": 1}, "GET_RESPONSE.id: expected str, got int"),
        (Kind.DELETE_RESPONSE, {}, "DELETE_RESPONSE: missing field 'id'"),
    ],
    ids=repr,
)
def test_the_broker_answers_a_malformed_question_with_a_400_naming_the_field(
    kind: Kind, body: Any, message: str
) -> None:
    answered, error = _ask(body, kind)
    assert (answered, error["code"], error["kind"]) == (Kind.ERROR, 400, "ProtocolError")
    assert message in error["description"]


def test_the_broker_reads_good_questions() -> None:
    assert _ask({"version": PROTOCOL_VERSION, "client": "x"}, Kind.PING) == (
        Kind.PONG,
        {"version": PROTOCOL_VERSION},
    )
    assert _ask({"id": "resp_a", "body": b"{}", "expected": None}, Kind.PUT_RESPONSE) == (
        Kind.ACK,
        {},
    )
    answered, error = _ask({"agent_id": "nobody", "what": "x"}, Kind.GET_AGENT_INFO)
    assert (answered, error["code"], error["kind"]) == (Kind.ERROR, 404, "UnknownAgent")


# ------------------------------------------------ an agent reading the broker's frames


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        (Kind.AGENT_QUERY, {"what": 1}, "AgentQuery.what: expected str, got int"),
        (
            Kind.REGISTERED,
            {"agent_id": "a1", "heartbeat_interval_ms": True},
            "Registered.heartbeat_interval_ms: expected int, got bool",
        ),
        (Kind.REGISTERED, {"agent_id": "a1"}, "Registered: missing field 'heartbeat_interval_ms'"),
        (Kind.DESIRED_STATE, {"state": [1]}, "DesiredState.state: expected dict or null, got list"),
        (Kind.DESIRED_STATE, [], "DesiredState: body must be a map, got list"),
    ],
    ids=repr,
)
def test_an_agent_drops_a_malformed_frame_naming_the_field(
    kind: Kind, body: Any, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = AgentSettings(broker_addr=f"tcp://127.0.0.1:{free_port()}", slots=2)
    service = AgentService(settings, FakeEngine(2))
    to_engine: list[list[bytes]] = []
    service.pipe.send_multipart = to_engine.append  # type: ignore[method-assign, assignment]
    try:
        with caplog.at_level(logging.WARNING, logger="paddler.agent"):
            service._from_broker(encode(kind, 0, body), 0.0)
        assert to_engine == [] and not service.registered
        assert f"dropped a frame from the broker: {message}" in caplog.text
        # the good bodies pass
        service._from_broker(encode(Kind.AGENT_QUERY, 3, {"what": "x", "more": 1}), 0.0)
        service._from_broker(encode(Kind.DESIRED_STATE, 0, {"state": None}), 0.0)
        assert [HEADER.unpack(f[0])[0] for f in to_engine] == [Kind.AGENT_QUERY, Kind.DESIRED_STATE]
        registered = {"agent_id": "a1", "heartbeat_interval_ms": 250}
        service._from_broker(encode(Kind.REGISTERED, 0, registered), 0.0)
        assert service.registered and service.heartbeat_s == 0.25
    finally:
        service.pipe.close(linger=0)
        if service.dealer is not None:
            service.dealer.close(linger=0)
        service.context.term()
