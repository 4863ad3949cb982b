"""With curve, the broker binds a registered agent's id to the key it authenticated
with: the same id registering with another key is refused (and the agent whose id it
claims is gone: see ``test_an_agent_is_its_key_on_every_message``)."""

from __future__ import annotations

from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker
from paddler.curve import fingerprint
from paddler.protocol.codec import decode, encode
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind

KEY_A = b"A" * 40
KEY_B = b"B" * 40


def _register(broker: Broker, key: bytes | None) -> list[tuple[int, dict]]:
    broker.outbox.clear()
    body = {"version": PROTOCOL_VERSION, "name": "box-1", "status": {"slots_total": 2}}
    broker.on_agent_message(b"box-1-id", encode(Kind.REGISTER, 0, body), 0.0, key)
    return [decode(frames)[::2] for _, _, frames in broker.outbox]


def test_the_same_id_with_another_key_is_refused_and_the_agent_it_claims_is_gone() -> None:
    """libzmq keeps one connection per id: a message under the agent's id with another
    key means the agent's own connection is gone, so the agent is removed (nothing is
    sent to that id for it any more) and the registration is refused."""
    broker = Broker(BrokerSettings())
    assert (Kind.REGISTERED, {"agent_id": "box-1-id", "heartbeat_interval_ms": 1000}) in (
        _register(broker, KEY_A)
    )
    (snapshot,) = broker.agent_snapshots()
    assert snapshot.key_fingerprint == fingerprint(KEY_A)
    replies = _register(broker, KEY_B)
    assert [kind for kind, _ in replies] == [Kind.ERROR]
    assert replies[0][1]["kind"] == "IdentityInUse"
    assert broker.agent_snapshots() == []
    # its own key gets it back
    assert Kind.REGISTERED in [kind for kind, _ in _register(broker, KEY_A)]


def test_the_same_key_may_register_again() -> None:
    broker = Broker(BrokerSettings())
    _register(broker, KEY_A)
    assert Kind.REGISTERED in [kind for kind, _ in _register(broker, KEY_A)]
    assert len(broker.agent_snapshots()) == 1


def test_without_curve_an_agent_has_no_key() -> None:
    broker = Broker(BrokerSettings())
    _register(broker, None)
    assert broker.agent_snapshots()[0].key_fingerprint is None
