"""The agent service gives the engine ids of its own: a balancer that restarted
numbers its requests from 1 again while the engine may still be ending an
abandoned request of the last session with the same number, and the two must
never mix (the frames of the old one are dropped; the new one's go out under the
broker's id)."""

from __future__ import annotations

from typing import Any

from paddler.agent.service import AgentService
from paddler.agent.settings import AgentSettings
from paddler.protocol.codec import HEADER, encode, pack_body
from paddler.protocol.kinds import Kind
from paddler.testing.cluster import free_port
from paddler.testing.fake_engine import FakeEngine


def _service() -> tuple[AgentService, list[list[bytes]], list[list[bytes]]]:
    settings = AgentSettings(broker_addr=f"tcp://127.0.0.1:{free_port()}", slots=2)
    service = AgentService(settings, FakeEngine(2))
    to_engine: list[list[bytes]] = []
    to_broker: list[list[bytes]] = []
    service.pipe.send_multipart = to_engine.append  # type: ignore[method-assign, assignment]
    service._send = to_broker.append  # type: ignore[method-assign]
    return service, to_engine, to_broker


def _ids(frames: list[list[bytes]]) -> list[tuple[int, int]]:
    return [HEADER.unpack(f[0]) for f in frames]


def test_a_reused_broker_id_never_reaches_the_old_request() -> None:
    service, to_engine, to_broker = _service()
    try:
        service._register(0.0)
        dispatch = encode(Kind.DISPATCH, 1, {"raw_prompt": "x"})
        service._from_broker(dispatch, 0.0)
        ((kind, old),) = _ids(to_engine)
        assert kind == Kind.DISPATCH
        # the balancer restarts: the agent registers again, abandoning request 1
        to_engine.clear()
        service._register(1.0)
        assert _ids(to_engine) == [(Kind.CANCEL, old)]
        to_engine.clear()
        service._from_broker(encode(Kind.DISPATCH, 1, {"raw_prompt": "y"}), 1.0)
        ((_, new),) = _ids(to_engine)
        assert new != old
        # a late frame of the abandoned request is dropped; the new one's are the broker's 1
        to_broker.clear()
        tokens: list[Any] = [HEADER.pack(Kind.TOKENS, old), pack_body(["old"])]
        service._from_engine(tokens)
        service._from_engine([HEADER.pack(Kind.TOKENS, new), pack_body(["new"]), b"\0" * 4])
        service._from_engine(encode(Kind.DONE, new, {"usage": {}}))
        assert _ids(to_broker) == [(Kind.TOKENS, 1), (Kind.DONE, 1)]
        assert to_broker[0][1:] == [pack_body(["new"]), b"\0" * 4]
        assert service.active == {}
        # a cancel for the ended request goes nowhere; one for a live request is mapped
        service._from_broker(encode(Kind.DISPATCH, 2, {"raw_prompt": "z"}), 2.0)
        live = _ids(to_engine)[-1][1]
        service._from_broker(encode(Kind.CANCEL, 1, {}), 2.0)
        service._from_broker(encode(Kind.CANCEL, 2, {}), 2.0)
        assert _ids(to_engine)[-1] == (Kind.CANCEL, live)
        assert [k for k, _ in _ids(to_engine)].count(Kind.CANCEL) == 1
    finally:
        service.pipe.close(linger=0)
        if service.dealer is not None:
            service.dealer.close(linger=0)
        service.context.term()


def test_a_second_dispatch_of_a_request_in_flight_is_dropped() -> None:
    service, to_engine, _ = _service()
    try:
        service._register(0.0)
        service._from_broker(encode(Kind.DISPATCH, 5, {"raw_prompt": "x"}), 0.0)
        service._from_broker(encode(Kind.DISPATCH, 5, {"raw_prompt": "x"}), 0.0)
        assert len(to_engine) == 1 and len(service.active) == 1
    finally:
        service.pipe.close(linger=0)
        if service.dealer is not None:
            service.dealer.close(linger=0)
        service.context.term()
