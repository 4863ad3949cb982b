"""``ClientCore`` and the query records driven directly: no sockets, no clock (every
``now`` is given), as the drivers in ``paddler.client.sync`` and ``.aio`` drive them."""

from __future__ import annotations

import gc

import pytest

from paddler.client import queries
from paddler.client.core import (
    DEFAULT_TIMEOUT_S,
    PING_AFTER_S,
    ClientCore,
    StreamState,
    add_text,
)
from paddler.client.events import Done, Failed, Tokens
from paddler.errors import BrokerUnreachable, ConfigurationError, RequestFailed
from paddler.protocol.codec import HEADER, encode, pack_body, unpack_body
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind
from paddler.protocol.messages import Usage

ADDRESS = "tcp://127.0.0.1:5555"


def make_core(timeout_s: float = DEFAULT_TIMEOUT_S) -> ClientCore:
    return ClientCore(ADDRESS, timeout_s, now=100.0)


def header(frames: list[bytes]) -> tuple[int, int]:
    kind, request_id = HEADER.unpack(frames[0])
    return kind, request_id


def error_frames(request_id: int, code: int, kind: str, description: str) -> list[bytes]:
    body = {"code": code, "kind": kind, "description": description}
    return encode(Kind.ERROR, request_id, body)


# ------------------------------------------------------------------ requests


def test_requests_get_increasing_ids_and_submit_frames() -> None:
    core = make_core()
    first, frames = core.submit({"raw_prompt": "hi"})
    second, _ = core.submit({"raw_prompt": "again"})
    assert (first, second) == (1, 2)
    assert header(frames) == (Kind.SUBMIT, 1)
    assert unpack_body(frames[1]) == {"raw_prompt": "hi"}
    assert core.open_requests == 2
    assert core.describe("Client") == f"<Client {ADDRESS} open_requests=2>"


def test_a_query_is_a_request_until_forgotten() -> None:
    core = make_core()
    request_id, frames = core.query(queries.agent_info("a1", "model_metadata"))
    assert header(frames) == (Kind.GET_AGENT_INFO, request_id)
    assert unpack_body(frames[1]) == {"agent_id": "a1", "what": "model_metadata"}
    assert core.open_requests == 1
    core.forget(request_id)
    core.forget(request_id)
    assert core.open_requests == 0


# ----------------------------------------------------------------- receiving


def test_received_messages_are_kept_per_request_in_order() -> None:
    core = make_core()
    first, _ = core.submit({})
    second, _ = core.submit({})
    assert core.receive(encode(Kind.TOKENS, second, ["b"]), now=101.0) == second
    assert core.receive(encode(Kind.TOKENS, first, ["a1"]), now=101.0) == first
    assert core.receive(encode(Kind.TOKENS, first, ["a2"]), now=101.0) == first
    assert core.next_message(first) == (Kind.TOKENS, pack_body(["a1"]))
    assert core.next_message(first) == (Kind.TOKENS, pack_body(["a2"]))
    assert core.next_message(first) is None
    assert core.next_message(second) == (Kind.TOKENS, pack_body(["b"]))


@pytest.mark.parametrize(
    "frames",
    [
        [HEADER.pack(Kind.TOKENS, 1)],
        [HEADER.pack(Kind.TOKENS, 1), pack_body(["x"]), b"extra"],
        [b"short", pack_body(["x"])],
        [HEADER.pack(Kind.TOKENS, 1) + b"!", pack_body(["x"])],
        [],
    ],
    ids=["one-frame", "three-frames", "short-header", "long-header", "empty"],
)
def test_malformed_messages_are_dropped(frames: list[bytes]) -> None:
    core = make_core()
    request_id, _ = core.submit({})
    assert core.receive(frames, now=101.0) is None
    assert core.next_message(request_id) is None


def test_messages_for_unknown_requests_are_dropped() -> None:
    core = make_core()
    assert core.receive(encode(Kind.PONG, 0, {"version": PROTOCOL_VERSION}), now=101.0) is None
    assert core.receive(encode(Kind.TOKENS, 42, ["late"]), now=101.0) is None
    assert core.open_requests == 0


def test_reading_an_unknown_or_cancelled_request_fails_with_499() -> None:
    core = make_core()
    with pytest.raises(RequestFailed) as unknown:
        core.next_message(7)
    assert (unknown.value.code, unknown.value.kind) == (499, "Cancelled")
    request_id, _ = core.submit({})
    core.cancel(request_id)
    with pytest.raises(RequestFailed) as cancelled:
        core.next_message(request_id)
    assert cancelled.value.code == 499


def test_a_terminal_event_ends_the_request() -> None:
    core = make_core()
    request_id, _ = core.submit({})
    assert core.event(request_id, (Kind.TOKENS, pack_body(["a", "b"]))) == Tokens(["a", "b"])
    assert core.open_requests == 1
    done = core.event(request_id, (Kind.DONE, pack_body({"usage": {"content_tokens": 2}})))
    assert done == Done(Usage(content_tokens=2))
    assert core.open_requests == 0
    failing, _ = core.submit({})
    failed = core.event(
        failing, (Kind.ERROR, pack_body({"code": 504, "kind": "T", "description": "d"}))
    )
    assert failed == Failed(504, "T", "d")
    assert core.open_requests == 0


def test_a_malformed_stream_frame_is_a_failure_event() -> None:
    core = make_core()
    request_id, _ = core.submit({})
    event = core.event(request_id, (Kind.TOKENS, b"\xc1"))
    assert isinstance(event, Failed)
    assert (event.code, event.kind) == (502, "ProtocolError")
    assert core.open_requests == 0


# ------------------------------------------------------------------- cancel


def test_cancel_returns_the_cancel_frames_once() -> None:
    core = make_core()
    request_id, _ = core.submit({})
    frames = core.cancel(request_id)
    assert frames is not None
    assert header(frames) == (Kind.CANCEL, request_id)
    assert unpack_body(frames[1]) == {}
    assert core.cancel(request_id) is None
    assert core.receive(encode(Kind.TOKENS, request_id, ["late"]), now=101.0) is None


def test_close_cancels_every_open_request_once() -> None:
    core = make_core()
    ids = [core.submit({})[0] for _ in range(3)]
    ended, _ = core.submit({})
    core.event(ended, (Kind.DONE, pack_body({"usage": {}})))
    cancels = core.close()
    assert [header(frames) for frames in cancels] == [(Kind.CANCEL, i) for i in ids]
    assert core.closed
    assert core.open_requests == 0
    assert core.close() == []
    assert core.cancel(ids[0]) is None


def test_a_cancel_after_close_has_nothing_to_send() -> None:
    core = make_core()
    request_id, _ = core.submit({})
    core.closed = True  # as if closing raced with a finalizer
    assert core.cancel(request_id) is None


# ------------------------------------------------------------------- timers


def test_nobody_waiting_means_no_ping_and_no_timeout() -> None:
    core = make_core(timeout_s=2.0)
    assert core.tick(now=1000.0) is None
    core.begin_wait(now=1000.0)
    assert core.tick(now=1000.5) is None


def test_a_silent_broker_is_pinged_then_given_up() -> None:
    core = make_core(timeout_s=3.0)
    core.begin_wait(now=200.0)
    assert core.tick(now=200.0 + PING_AFTER_S / 2) is None
    ping = core.tick(now=200.0 + PING_AFTER_S)
    assert ping is not None
    assert header(ping) == (Kind.PING, 0)
    assert unpack_body(ping[1]) == {"version": PROTOCOL_VERSION}
    assert core.tick(now=200.0 + PING_AFTER_S * 1.5) is None  # at most one per interval
    assert core.tick(now=200.0 + PING_AFTER_S * 2) is not None
    with pytest.raises(BrokerUnreachable, match=r"did not answer for 3\.2 s") as raised:
        core.tick(now=203.2)
    assert ADDRESS in str(raised.value)
    assert isinstance(raised.value, TimeoutError)
    # the next period of silence is measured afresh
    assert core.tick(now=203.3) is None


def test_anything_heard_resets_the_silence() -> None:
    core = make_core(timeout_s=3.0)
    core.begin_wait(now=0.0)
    core.receive(encode(Kind.PONG, 0, {"version": PROTOCOL_VERSION}), now=2.5)
    assert core.tick(now=3.0) is None
    core.receive([b"garbage"], now=5.0)
    assert core.tick(now=5.5) is None
    with pytest.raises(BrokerUnreachable):
        core.tick(now=8.0)


def test_silence_counts_from_the_first_wait_not_from_the_last_message() -> None:
    core = make_core(timeout_s=3.0)  # last heard at 100
    core.begin_wait(now=500.0)
    assert core.tick(now=500.1) is None
    core.begin_wait(now=502.0)  # a second waiter does not extend the first one's patience
    with pytest.raises(BrokerUnreachable):
        core.tick(now=503.0)
    core.end_wait()
    core.end_wait()
    assert core.tick(now=600.0) is None


def test_ticks_are_frequent_enough_for_both_rules() -> None:
    assert make_core(timeout_s=5.0).tick_s == PING_AFTER_S / 2
    assert make_core(timeout_s=0.2).tick_s == pytest.approx(0.1)


def test_cannot_send_names_the_balancer() -> None:
    error = make_core().cannot_send()
    assert isinstance(error, BrokerUnreachable)
    assert str(error) == f"cannot send to the balancer at {ADDRESS}"


# ------------------------------------------------------------------ queries


def test_a_query_answer_is_its_field() -> None:
    reply = (Kind.AGENTS, pack_body({"agents": [{"id": "a"}]}))
    assert queries.AGENTS.answer(reply) == [{"id": "a"}]
    assert queries.BUFFERED_REQUESTS.answer((Kind.BUFFERED, pack_body({"count": 3}))) == 3
    assert queries.METRICS.answer((Kind.METRICS, pack_body({"x": 1}))) == {"x": 1}
    assert queries.APPLICABLE_STATE.answer((Kind.STATE, pack_body({"state": None}))) is None


def test_invalid_desired_state_is_a_configuration_error() -> None:
    frames = error_frames(1, 400, "InvalidDesiredState", "model: must name a model")
    with pytest.raises(ConfigurationError) as raised:
        queries.put_desired_state({}).answer((Kind.ERROR, frames[1]))
    assert (raised.value.field, raised.value.message) == ("model", "must name a model")


def test_other_query_errors_are_request_failures() -> None:
    frames = error_frames(1, 404, "AgentNotFound", "no agent x")
    with pytest.raises(RequestFailed) as raised:
        queries.agent_info("x", "model_metadata").answer((Kind.ERROR, frames[1]))
    assert (raised.value.code, raised.value.kind) == (404, "AgentNotFound")


def test_a_reply_of_the_wrong_kind_or_shape_is_a_protocol_failure() -> None:
    with pytest.raises(RequestFailed, match="expected AGENTS, got kind 43") as wrong_kind:
        queries.AGENTS.answer((Kind.STATE, pack_body({"state": {}})))
    assert wrong_kind.value.code == 502
    with pytest.raises(RequestFailed, match="AGENTS without a 'agents' field") as wrong_shape:
        queries.AGENTS.answer((Kind.AGENTS, pack_body([])))
    assert wrong_shape.value.code == 502


# ------------------------------------------------------------------ streams


def test_a_stream_ends_at_its_terminal_event_and_is_not_cancelled() -> None:
    core = make_core()
    cancelled: list[int] = []
    request_id, _ = core.submit({})
    stream = StreamState(core, request_id, cancelled.append)
    assert stream._take((Kind.TOKENS, pack_body(["a"]))) == Tokens(["a"])
    assert not stream.finished
    assert isinstance(stream._take((Kind.DONE, pack_body({"usage": {}}))), Done)
    assert stream.finished
    stream.cancel()
    del stream
    gc.collect()
    assert cancelled == []


def test_a_stream_cancels_once_when_cancelled_or_dropped() -> None:
    core = make_core()
    cancelled: list[int] = []
    first = StreamState(core, core.submit({})[0], cancelled.append)
    first.cancel()
    first.cancel()
    assert first.finished
    second = StreamState(core, core.submit({})[0], cancelled.append)
    del second  # no cycle: the finalizer runs at once
    assert cancelled == [1, 2]


def test_text_collects_pieces_and_raises_a_failure() -> None:
    parts: list[str] = []
    add_text(parts, Tokens(["a", "b"]))
    add_text(parts, Done(Usage()))
    assert parts == ["a", "b"]
    with pytest.raises(RequestFailed) as raised:
        add_text(parts, Failed(503, "BufferOverflow", "full"))
    assert raised.value.code == 503


def test_the_names_imported_from_the_sync_module_are_still_there() -> None:
    from paddler.client import sync

    assert sync.DEFAULT_TIMEOUT_S == DEFAULT_TIMEOUT_S
    assert sync.PING_AFTER_S == PING_AFTER_S
    assert sync.query_failure is queries.query_failure
    assert callable(sync.configure_dealer)
