from __future__ import annotations

import random

import msgpack
import zmq

from paddler.client import Done
from paddler.protocol.codec import MAX_BODY_BYTES, encode, make_header
from paddler.protocol.kinds import Kind


def _garbage(rng: random.Random) -> list[bytes]:
    shapes = [
        lambda: [rng.randbytes(rng.randint(0, 40))],
        lambda: [rng.randbytes(9), rng.randbytes(rng.randint(0, 200))],
        lambda: [
            make_header(rng.choice(list(Kind)), rng.randint(0, 2**64 - 1)),
            rng.randbytes(rng.randint(0, 64)),
        ],
        lambda: [
            make_header(rng.choice(list(Kind)), 1),
            msgpack.packb(
                rng.choice([None, 1, "x", [1, 2], {"version": "1"}, {"state": 3}, {"status": {}}])
            ),
        ],
        lambda: [rng.randbytes(9) for _ in range(rng.randint(3, 6))],
        lambda: [make_header(Kind.TOKENS, rng.randint(0, 5)), b"\xc1"],
        lambda: [make_header(Kind.DONE, rng.randint(0, 5)), msgpack.packb({"usage": 1})],
    ]
    return rng.choice(shapes)()


def test_a_stream_of_garbage_frames_to_both_sockets_leaves_the_broker_serving(
    make_cluster,
) -> None:
    cluster = make_cluster()
    balancer = cluster.start_balancer()
    cluster.start_agent("honest", slots=2)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    rng = random.Random(1234)
    context = zmq.Context()
    try:
        for address in (cluster.agents_addr, cluster.clients_addr):
            for round_ in range(3):
                socket = context.socket(zmq.DEALER)
                socket.setsockopt(zmq.LINGER, 0)
                socket.connect(address)
                for _ in range(500):
                    socket.send_multipart(_garbage(rng))
                # one message over MAXMSGSIZE: the broker drops the connection, not itself
                if round_ == 0:
                    socket.send_multipart(
                        [make_header(Kind.SUBMIT, 1), b"x" * (MAX_BODY_BYTES + 8192)]
                    )
                socket.close()
        # a well-formed request between the garbage still works
        events = list(client.continue_from_raw_prompt("still here", max_tokens=3))
        assert isinstance(events[-1], Done)
        assert balancer.alive()
        assert [a["name"] for a in client.agents()] == ["honest"]
        assert "Traceback" not in balancer.log()
    finally:
        context.term()


def test_an_agent_with_another_protocol_version_gets_a_clear_error(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start_balancer()
    client = cluster.client()
    context = zmq.Context()
    try:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(cluster.agents_addr)
        socket.send_multipart(
            encode(
                Kind.REGISTER, 0, {"version": 999, "name": "future", "status": {"slots_total": 1}}
            )
        )
        assert socket.poll(5000)
        header, body = socket.recv_multipart()
        assert header[0] == Kind.ERROR
        error = msgpack.unpackb(body)
        assert error["kind"] == "ProtocolVersionMismatch"
        assert "version 999" in error["description"]
        assert client.agents() == []
        socket.close()
    finally:
        context.term()
