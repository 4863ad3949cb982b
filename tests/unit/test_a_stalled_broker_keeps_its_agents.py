"""A broker that stalls (the machine paused it longer than the agents' liveness)
does not drop its agents for the heartbeats it did not read meanwhile; and a peer it
does not know hears REREGISTER once per interval, not once per stray frame."""

from __future__ import annotations

from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker
from paddler.protocol.codec import HEADER, encode
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind


def _register(broker: Broker, agent: bytes, now: float) -> None:
    body = {"version": PROTOCOL_VERSION, "name": None, "status": {"slots_total": 1}}
    broker.on_agent_message(agent, encode(Kind.REGISTER, 0, body), now)


def test_time_the_broker_did_not_run_is_not_its_agents_silence() -> None:
    broker = Broker(BrokerSettings(heartbeat_interval=1000))
    for index in range(3):
        _register(broker, f"agent-{index}".encode(), 0.0)
    for now in (0.5, 1.0):
        broker.tick(now)
    broker.tick(5.0)  # stalled 4 s: longer than 3 intervals
    assert len(broker.agents) == 3
    # heard again once the broker reads its socket: they stay
    broker.on_agent_message(b"agent-0", encode(Kind.HEARTBEAT, 0, {}), 5.01)
    broker.tick(5.1)
    assert len(broker.agents) == 3
    # really silent ones still go, 3 intervals of the broker running later
    for step in range(1, 40):
        broker.on_agent_message(b"agent-0", encode(Kind.HEARTBEAT, 0, {}), 5.1 + step * 0.1)
        broker.tick(5.1 + step * 0.1)
    assert list(broker.agents) == [b"agent-0"]


def test_an_unknown_peer_is_asked_to_register_once_per_interval() -> None:
    broker = Broker(BrokerSettings(heartbeat_interval=1000))
    for step in range(20):
        broker.on_agent_message(b"stranger", encode(Kind.HEARTBEAT, 0, {}), step * 0.1)
    asked = [f for _, _, f in broker.outbox if HEADER.unpack(f[0])[0] == Kind.REREGISTER]
    assert len(asked) == 2  # at 0.0 s and at 1.0 s
