"""The responses the OpenAI Responses API keeps at the balancer
(``paddler.broker.store.ResponseStore``): kept, read and forgotten by id; bounded in
count, in size each and in bytes together, the oldest evicted first; a database file
in WAL mode that keeps them across restarts. The broker answers the client frames
that put, get and delete them, a malformed one with a 400, a failing database with a
503, and goes on serving."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from paddler.broker.server import BrokerServer
from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker
from paddler.broker.store import (
    MAX_RESPONSE_ID,
    MAX_STORED_RESPONSE_BYTES,
    ResponseStore,
    ResponseTooLarge,
    StoredChanged,
)
from paddler.client import Client
from paddler.errors import ConfigurationError, RequestFailed
from paddler.protocol.codec import HEADER, decode
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind

LOOPBACK = "tcp://127.0.0.1:*"


def _ids(store: ResponseStore) -> list[str]:
    rows = store._db.execute("SELECT id FROM stored_responses ORDER BY seq").fetchall()
    return [row[0] for row in rows]


# ------------------------------------------------------------------------ the store


def test_a_response_is_kept_read_replaced_and_forgotten() -> None:
    store = ResponseStore()
    assert store.get("resp_a") is None
    store.put("resp_a", b"one")
    store.put("resp_b", b"two")
    assert (store.get("resp_a"), store.get("resp_b")) == (b"one", b"two")
    store.put("resp_a", b"again")  # the same id: replaced, and now the newest
    assert store.get("resp_a") == b"again" and _ids(store) == ["resp_b", "resp_a"]
    assert (store.count, store.total_bytes) == (2, 8)
    assert store.delete("resp_a") is True and store.delete("resp_a") is False
    assert store.get("resp_a") is None and (store.count, store.total_bytes) == (1, 3)


def test_a_conditional_put_replaces_only_the_body_it_read() -> None:
    """What a read-modify-write (a conversation's items) relies on: two writers that
    read the same body cannot both replace it."""
    store = ResponseStore()
    with pytest.raises(KeyError):
        store.put("conv_a", b"new", expected=b"old")
    assert store.get("conv_a") is None
    store.put("conv_a", b"one")
    store.put("conv_a", b"two", expected=b"one")
    with pytest.raises(StoredChanged):
        store.put("conv_a", b"three", expected=b"one")  # it was read before "two"
    assert store.get("conv_a") == b"two" and (store.count, store.total_bytes) == (1, 3)


def test_past_the_count_the_oldest_are_forgotten_first() -> None:
    store = ResponseStore(max_count=3)
    for n in range(5):
        store.put(f"resp_{n}", b"x")
    assert _ids(store) == ["resp_2", "resp_3", "resp_4"] and store.count == 3


def test_past_the_bytes_together_the_oldest_are_forgotten_first() -> None:
    store = ResponseStore(max_bytes=2048, max_total_bytes=4096)
    for n in range(4):
        store.put(f"resp_{n}", bytes(1024))
    assert store.put("resp_big", bytes(2048)) == 2  # two made room
    assert _ids(store) == ["resp_2", "resp_3", "resp_big"]
    assert store.total_bytes == 4096


def test_a_response_too_large_is_refused_and_evicts_nothing() -> None:
    store = ResponseStore(max_bytes=1024)
    store.put("resp_a", b"a")
    with pytest.raises(ResponseTooLarge, match="at most 1024 bytes, this one has 1025"):
        store.put("resp_b", bytes(1025))
    assert _ids(store) == ["resp_a"]


def test_with_a_count_of_zero_nothing_is_kept() -> None:
    store = ResponseStore(max_count=0)
    with pytest.raises(ResponseTooLarge, match="keeps no responses"):
        store.put("resp_a", b"a")
    assert store.count == 0


def test_a_stored_response_must_fit_in_one_message() -> None:
    with pytest.raises(ConfigurationError, match="at most"):
        ResponseStore(max_bytes=MAX_STORED_RESPONSE_BYTES + 1)


def test_a_database_file_keeps_them_in_wal_mode_and_new_bounds_evict(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = ResponseStore(str(path))
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = store._db.execute("PRAGMA synchronous").fetchone()[0]
    assert (mode, synchronous) == ("wal", 1)  # 1: NORMAL
    for n in range(4):
        store.put(f"resp_{n}", b"abc")
    store.close()
    again = ResponseStore(f"sqlite://{path}", max_count=2)
    assert _ids(again) == ["resp_2", "resp_3"]
    assert (again.count, again.total_bytes, again.get("resp_3")) == (2, 6, b"abc")
    again.close()


# ------------------------------------------------------------------------ the broker


def _ask(broker: Broker, kind: Kind, body: Any, request_id: int = 7) -> tuple[int, Any]:
    """Send one client frame to the broker: the kind and body of its one answer."""
    broker.outbox.clear()
    frames = [
        HEADER.pack(kind, request_id),
        body if isinstance(body, bytes) else msgpack.packb(body),
    ]
    broker.on_client_message(b"client", frames, 0.0)
    [(_, identity, answer)] = broker.outbox
    answered_kind, answered_id, answered = decode(answer)
    assert (identity, answered_id) == (b"client", request_id)
    return answered_kind, answered


@pytest.fixture
def broker() -> Broker:
    return Broker(BrokerSettings(max_stored_responses=2, max_stored_response_bytes=1024))


def test_the_broker_puts_gets_and_deletes_stored_responses(broker: Broker) -> None:
    assert _ask(broker, Kind.PUT_RESPONSE, {"id": "resp_a", "body": b"{}"}) == (Kind.ACK, {})
    assert _ask(broker, Kind.GET_RESPONSE, {"id": "resp_a"}) == (
        Kind.STORED_RESPONSE,
        {"body": b"{}"},
    )
    assert _ask(broker, Kind.DELETE_RESPONSE, {"id": "resp_a"}) == (Kind.ACK, {})
    for kind in (Kind.GET_RESPONSE, Kind.DELETE_RESPONSE):
        answered, error = _ask(broker, kind, {"id": "resp_a"})
        assert (answered, error["code"], error["kind"]) == (Kind.ERROR, 404, "UnknownResponse")
    answered, error = _ask(broker, Kind.PUT_RESPONSE, {"id": "resp_b", "body": bytes(1025)})
    assert (answered, error["code"], error["kind"]) == (Kind.ERROR, 413, "ResponseTooLarge")
    conditional = {"id": "resp_c", "body": b"2", "expected": b"1"}
    answered, error = _ask(broker, Kind.PUT_RESPONSE, conditional)
    assert (answered, error["code"], error["kind"]) == (Kind.ERROR, 404, "UnknownResponse")
    assert _ask(broker, Kind.PUT_RESPONSE, {"id": "resp_c", "body": b"1"}) == (Kind.ACK, {})
    assert _ask(broker, Kind.PUT_RESPONSE, conditional) == (Kind.ACK, {})
    answered, error = _ask(broker, Kind.PUT_RESPONSE, conditional)  # "1" is gone
    assert (answered, error["code"], error["kind"]) == (Kind.ERROR, 409, "StoredChanged")


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # not msgpack
        msgpack.packb([1, 2]),
        {},
        {"id": 3},
        {"id": ""},
        {"id": "r" * (MAX_RESPONSE_ID + 1)},
        {"id": "resp_a"},  # a put without its body
        {"id": "resp_a", "body": "text, not bytes"},
        {"id": "resp_a", "body": b"x", "expected": "text, not bytes"},
    ],
)
def test_a_malformed_frame_is_answered_with_a_400(broker: Broker, body: Any) -> None:
    answered, error = _ask(broker, Kind.PUT_RESPONSE, body)
    assert (answered, error["code"], error["kind"]) == (Kind.ERROR, 400, "ProtocolError")
    assert broker.responses.count == 0
    assert _ask(broker, Kind.PING, {"version": PROTOCOL_VERSION})[0] == Kind.PONG


@given(
    kind=st.sampled_from([Kind.PUT_RESPONSE, Kind.GET_RESPONSE, Kind.DELETE_RESPONSE]),
    body=st.one_of(
        st.binary(max_size=64),
        st.dictionaries(
            st.sampled_from(["id", "body", "expected", "x"]),
            st.one_of(
                st.none(),
                st.integers(min_value=-(2**63), max_value=2**64 - 1),  # what msgpack packs
                st.text(max_size=140),
                st.binary(max_size=2048),
            ),
        ),
    ),
)
def test_any_frame_of_these_kinds_gets_one_answer_and_never_raises(kind: Kind, body: Any) -> None:
    broker = Broker(BrokerSettings(max_stored_responses=2, max_stored_response_bytes=1024))
    answered, value = _ask(broker, kind, body)
    assert answered in (Kind.ACK, Kind.STORED_RESPONSE, Kind.ERROR)
    if answered == Kind.ERROR:
        assert value["code"] in (400, 404, 409, 413)
    assert broker.responses.count <= 2 and broker.responses.total_bytes <= 2048


def test_a_failing_database_is_a_503_and_the_broker_goes_on(broker: Broker) -> None:
    broker.responses._db.close()  # every statement now raises sqlite3.ProgrammingError
    assert issubclass(sqlite3.ProgrammingError, sqlite3.Error)
    for kind in (Kind.PUT_RESPONSE, Kind.GET_RESPONSE, Kind.DELETE_RESPONSE):
        answered, error = _ask(broker, kind, {"id": "resp_a", "body": b"x"})
        assert (answered, error["code"], error["kind"]) == (Kind.ERROR, 503, "ResponseStoreFailed")
    assert _ask(broker, Kind.PING, {"version": PROTOCOL_VERSION})[0] == Kind.PONG


def test_a_client_keeps_reads_and_forgets_responses_at_a_real_broker() -> None:
    """The broker serves on this thread (its databases belong to it), the client
    speaks from another."""
    server = BrokerServer(
        BrokerSettings(
            agents_addr=LOOPBACK,
            clients_addr=LOOPBACK,
            max_stored_responses=2,
            max_stored_response_bytes=2048,
        )
    )
    address = server.clients.getsockopt_string(zmq.LAST_ENDPOINT)
    failures: list[BaseException] = []

    def speak() -> None:
        try:
            with Client(address, timeout_s=5) as client:
                for n in range(3):
                    client.put_response(f"resp_{n}", f"body {n}".encode())
                assert client.get_response("resp_2") == b"body 2"
                with pytest.raises(RequestFailed) as evicted:
                    client.get_response("resp_0")  # the oldest made room
                assert (evicted.value.code, evicted.value.kind) == (404, "UnknownResponse")
                with pytest.raises(RequestFailed) as too_large:
                    client.put_response("resp_9", bytes(4096))
                assert too_large.value.code == 413
                client.put_response("resp_2", b"body 2b", expected=b"body 2")
                with pytest.raises(RequestFailed) as changed:
                    client.put_response("resp_2", b"body 2c", expected=b"body 2")
                assert (changed.value.code, changed.value.kind) == (409, "StoredChanged")
                client.delete_response("resp_2")
                with pytest.raises(RequestFailed) as deleted:
                    client.delete_response("resp_2")
                assert deleted.value.code == 404
                client.ping()
        except BaseException as exc:
            failures.append(exc)
        finally:
            server.stop()

    client_thread = threading.Thread(target=speak)
    client_thread.start()
    server.run()  # until the client is done
    client_thread.join(10)
    if failures:
        raise failures[0]
