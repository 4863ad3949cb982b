"""``BATCH`` messages: several messages in one frame, as an agent sends an engine
step's frames and the balancer sends a client what one pass over its sockets gave
it. Packing and unpacking keep every message whole and in order; a malformed batch
is refused whole, by the balancer (counted as a dropped frame) and by a client."""

from __future__ import annotations

import struct

import pytest

from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker
from paddler.client.core import ClientCore
from paddler.client.events import Done, Tokens
from paddler.errors import ProtocolError
from paddler.protocol.codec import (
    BATCH_BYTES,
    BATCH_RECORD,
    HEADER,
    batched,
    encode,
    is_batch,
    messages_of,
    pack_body,
    pack_token_ids,
    unbatch,
)
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind


def _tokens(request_id: int, text: str, token_id: int) -> list[bytes]:
    return [HEADER.pack(Kind.TOKENS, request_id), pack_body([text]), pack_token_ids([token_id])]


def test_fewer_than_two_messages_are_sent_as_they_are() -> None:
    assert batched([]) == []
    one = _tokens(1, "a", 7)
    assert batched([one]) == [one]


def test_a_batch_gives_back_every_message_whole_and_in_order() -> None:
    messages = [
        _tokens(1, "a", 7),
        encode(Kind.DONE, 2, {"usage": {"content_tokens": 3}}),
        _tokens(3, "", 2**31 - 1),
        encode(Kind.ERROR, 4, {"code": 500, "kind": "X", "description": "y"}),
        # a text frame whose tokens went out with the frame before: an empty ids
        # frame, which is not "no ids" (that one cannot continue elsewhere)
        [HEADER.pack(Kind.TOKENS, 2**64 - 1), b"", b""],
    ]
    (batch,) = batched(messages)
    assert len(batch) == 2 and HEADER.unpack(batch[0]) == (Kind.BATCH, len(messages))
    assert unbatch(batch) == messages
    assert [len(m) for m in unbatch(batch)] == [3, 2, 3, 2, 3]


def test_no_batch_outgrows_its_size_and_a_message_too_large_goes_alone() -> None:
    big = [HEADER.pack(Kind.EMBEDDING, 1), b"\x90" * (BATCH_BYTES * 6 // 10)]
    huge = [HEADER.pack(Kind.EMBEDDING, 2), b"\x90" * (BATCH_BYTES * 2)]
    small = _tokens(3, "x", 1)
    messages = [small, big, big, small, small, huge, small, small]
    out = batched(messages)
    assert [HEADER.unpack(m[0]) for m in out] == [
        (Kind.BATCH, 2),  # small, big: a second big would pass the size
        (Kind.BATCH, 3),  # big, small, small
        (Kind.EMBEDDING, 2),  # too large for any batch: alone, as it is
        (Kind.BATCH, 2),
    ]
    assert all(len(m[1]) <= BATCH_BYTES for m in out if is_batch(m))
    assert [message for m in out for message in messages_of(m)] == messages


def _record(kind: int, request_id: int, body: bytes, ids: bytes = b"") -> bytes:
    return BATCH_RECORD.pack(kind, request_id, len(body), len(ids)) + body + ids


@pytest.mark.parametrize(
    ("frames", "problem"),
    [
        ([HEADER.pack(Kind.BATCH, 2), _record(Kind.DONE, 1, b"\x80")], "cannot hold 2"),
        (
            [HEADER.pack(Kind.BATCH, 2), _record(Kind.DONE, 1, b"\x80" * 20) + b"\0" * 10],
            "inside a message header",
        ),
        ([HEADER.pack(Kind.BATCH, 1), _record(Kind.DONE, 1, b"\x80")[:-1]], "inside a message"),
        ([HEADER.pack(Kind.BATCH, 1), _record(Kind.DONE, 1, b"\x80") + b"!"], "after the last"),
        ([HEADER.pack(Kind.BATCH, 1), _record(Kind.BATCH, 1, b"")], "a batch inside a batch"),
        ([HEADER.pack(Kind.BATCH, 2**64 - 1), b"\0" * 64], "cannot hold"),
        ([HEADER.pack(Kind.BATCH, 1)], "2 frames"),
        (
            [HEADER.pack(Kind.BATCH, 1), struct.pack(">BQII", 10, 1, 2**32 - 1, 0)],
            "inside a message body",
        ),
        (
            [HEADER.pack(Kind.BATCH, 1), struct.pack(">BQII", 10, 1, 0, 2**32 - 1)],
            "inside a message body",
        ),
    ],
)
def test_a_malformed_batch_is_refused_whole(frames: list[bytes], problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        unbatch(frames)


def test_the_broker_drops_a_malformed_batch_and_a_registration_inside_one() -> None:
    broker = Broker(BrokerSettings(state_database=":memory:"))
    assert broker.agent_batch(b"a1", [HEADER.pack(Kind.BATCH, 3), b"\0"], 0.0) == []
    assert broker.metrics.dropped_frames == 1
    register = encode(Kind.REGISTER, 0, {"version": PROTOCOL_VERSION, "name": "x"})
    heartbeat = encode(Kind.HEARTBEAT, 0, {})
    (batch,) = batched([register, heartbeat])
    assert broker.agent_batch(b"a1", batch, 0.0) == [heartbeat]
    assert broker.metrics.dropped_frames == 2


def test_a_client_takes_every_message_of_a_batch_and_drops_a_malformed_one() -> None:
    core = ClientCore("tcp://127.0.0.1:5555", 5.0, now=100.0)
    first, _ = core.submit({"raw_prompt": "a"})
    second, _ = core.submit({"raw_prompt": "b"})
    (batch,) = batched(
        [
            encode(Kind.TOKENS, first, ["a1"]),
            encode(Kind.TOKENS, second, ["b1"]),
            encode(Kind.TOKENS, 99, ["not ours"]),
            encode(Kind.DONE, first, {"usage": {}}),
        ]
    )
    assert core.receive_all(batch, now=101.0) == [first, second, first]
    assert core.receive_all([HEADER.pack(Kind.BATCH, 5), b"\0"], now=101.0) == []
    events = []
    while (message := core.next_message(first)) is not None:
        events.append(core.event(first, message))
        if isinstance(events[-1], Done):
            break
    assert isinstance(events[0], Tokens) and events[0].pieces == ["a1"]
    assert isinstance(events[1], Done)
    message = core.next_message(second)
    assert message is not None and core.event(second, message).pieces == ["b1"]  # type: ignore[union-attr]
