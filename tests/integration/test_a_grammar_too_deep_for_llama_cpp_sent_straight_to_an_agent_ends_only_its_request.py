"""A DISPATCH frame that skipped every check before the agent (a broker bug, a frame
sent straight to an agent) carries the grammar that crashed llama.cpp's parser: the
agent refuses it as ``GrammarSyntaxError`` and keeps serving.

This test is the broker: it binds the agents' ROUTER and speaks to a real
``paddler agent`` (llama.cpp, the tiny model) frame by frame."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from paddler.protocol.codec import HEADER, encode, messages_of, pack_body
from paddler.protocol.kinds import Kind
from paddler.protocol.requests import validate_request
from paddler.testing.tiny_model import write_tiny_llama

DEEP = 60_000
DEEP_GRAMMAR = "root ::= " + "(" * DEEP + '"a"' + ")" * DEEP


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


def _receive(router: zmq.Socket[bytes], timeout_s: float) -> list[tuple[int, int, Any]]:
    """The messages of what the agent sends next (a step's come as one ``BATCH``)."""
    assert router.poll(int(timeout_s * 1000)), "the agent said nothing"
    _, *frames = router.recv_multipart()
    out = []
    for header, body, *_token_ids in messages_of(frames):  # tokens: their ids too
        kind, request_id = HEADER.unpack(header)
        out.append((kind, request_id, msgpack.unpackb(body)))
    return out


def _until(router: zmq.Socket[bytes], wanted: Any, timeout_s: float = 30.0) -> tuple[int, Any]:
    """The first message ``wanted(kind, request_id, body)`` accepts; others are skipped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for kind, request_id, body in _receive(router, deadline - time.monotonic()):
            if wanted(kind, request_id, body):
                return kind, body
    raise AssertionError("the agent did not answer in time")


def test_a_60000_deep_grammar_in_a_dispatch_frame_ends_only_that_request(
    make_cluster, model
) -> None:
    cluster = make_cluster()
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    try:
        router.bind(cluster.agents_addr)
        agent = cluster.start_real_agent("llama", slots=2)
        assert router.poll(20_000), "the agent did not connect"
        identity, header, _ = router.recv_multipart()
        assert HEADER.unpack(header)[0] == Kind.REGISTER

        def send(kind: Kind, request_id: int, body: Any) -> None:
            router.send_multipart([identity, *encode(kind, request_id, body)])

        # a heartbeat interval longer than the test: it never needs one from us
        send(Kind.REGISTERED, 0, {"agent_id": "llama", "heartbeat_interval_ms": 600_000})
        state = {
            "model": {"LocalToAgent": str(model)},
            "inference_parameters": {"context_size": 256, "temperature": 0.0},
        }
        send(Kind.DESIRED_STATE, 0, {"state": state})
        _until(router, lambda kind, _, body: kind == Kind.AGENT_STATUS and body.get("ready"))

        # the wire form a broker dispatches, with a grammar no check has seen
        deep = validate_request({"raw_prompt": "x", "max_tokens": 4})
        deep["grammar"] = {"type": "gbnf", "grammar": DEEP_GRAMMAR, "root": "root"}
        router.send_multipart([identity, HEADER.pack(Kind.DISPATCH, 1), pack_body(deep)])
        kind, body = _until(router, lambda kind, rid, _: rid == 1 and kind != Kind.TOKENS)
        assert kind == Kind.ERROR
        assert body["kind"] == "GrammarSyntaxError", body
        assert "deeper than 64" in body["description"] or "longer than" in body["description"]

        # the same agent serves the next request, grammar and all
        plain = validate_request(
            {
                "raw_prompt": "x",
                "max_tokens": 3,
                "grammar": {"type": "gbnf", "grammar": 'root ::= ("a")+'},
            }
        )
        send(Kind.DISPATCH, 2, plain)
        pieces: list[str] = []

        def end_of_two(kind: int, request_id: int, body: Any) -> bool:
            if request_id == 2 and kind == Kind.TOKENS:
                pieces.extend(body)
            return request_id == 2 and kind in (Kind.DONE, Kind.ERROR)

        kind, body = _until(router, end_of_two)
        assert kind == Kind.DONE, body
        assert "".join(pieces) and set("".join(pieces)) == {"a"}
        assert agent.alive()
        assert "Traceback" not in agent.log()
    finally:
        router.close()
        context.term()
