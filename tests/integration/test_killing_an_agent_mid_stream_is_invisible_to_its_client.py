"""An agent killed (SIGKILL) while it streams a request: the request continues on
another agent from the tokens already streamed, and its client, whatever API it
uses (paddler.client, NDJSON, WebSocket, OpenAI SSE through the ``openai`` SDK),
sees the whole answer once, no error, and the usage of the whole answer. The
balancer counts each continuation in ``paddler_continuations_total``."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from websockets.sync.client import connect

from paddler.client import Dispatched, Done, Tokens
from paddler.testing.cluster import LocalCluster, free_port, wait_until

MAX_TOKENS = 150
WHOLE = "".join(f"t{i} " for i in range(MAX_TOKENS))
"""What a fake agent streams for ``MAX_TOKENS`` tokens, wherever it continues."""


class Fleet:
    """A balancer with all three HTTP services and two fake agents; ``kill_busy``
    kills the agent serving the one running request and starts a fresh one."""

    def __init__(self, make_cluster: Callable[..., LocalCluster]) -> None:
        self.cluster = make_cluster(
            heartbeat_interval=200,
            buffered_request_timeout=20_000,
            compat_openai_addr=f"127.0.0.1:{free_port()}",
        )
        self.cluster.start_balancer()
        self.client = self.cluster.client()
        self.started = 0
        for _ in range(2):
            self._start_agent()
        self.cluster.wait_for_agents(self.client, 2)
        self.cluster.wait_for_http()
        self.killed: list[str] = []

    def _start_agent(self) -> None:
        self.started += 1
        self.cluster.start_agent(f"agent{self.started}", slots=1, step_ms=15)

    def kill_busy(self) -> str:
        busy = wait_until(
            lambda: [a["name"] for a in self.client.agents() if a["slots_processing"]],
            what="an agent serving the request",
        )
        (name,) = busy
        self.cluster.agents[name].signal(signal.SIGKILL)
        self.killed.append(name)
        self._start_agent()
        return str(name)

    def continuations(self) -> float:
        for line in httpx.get(f"{self.cluster.management_url}/metrics").text.splitlines():
            if line.startswith("paddler_continuations_total "):
                return float(line.split()[1])
        raise AssertionError("paddler_continuations_total is missing")


@pytest.fixture
def fleet(make_cluster: Callable[..., LocalCluster]) -> Iterator[Fleet]:
    yield Fleet(make_cluster)


def _kill_after(fleet: Fleet, received: str, killed: list[str]) -> None:
    """Kill the serving agent once a few tokens reached the client."""
    if not killed and received.count(" ") >= 5:
        killed.append(fleet.kill_busy())


def test_the_native_client(fleet: Fleet) -> None:
    killed: list[str] = []
    text, agents, usage = "", [], None
    for event in fleet.client.continue_from_raw_prompt("hello world", max_tokens=MAX_TOKENS):
        if isinstance(event, Dispatched):
            agents.append(event.agent_name)
        elif isinstance(event, Tokens):
            text += "".join(event.pieces)
            _kill_after(fleet, text, killed)
        else:
            assert isinstance(event, Done), event
            usage = event.usage
    assert text == WHOLE
    assert usage is not None and usage.content_tokens == MAX_TOKENS and usage.prompt_tokens == 2
    # a second Dispatched names the agent that took the stream over
    assert len(agents) == 2 and agents[0] == killed[0] and agents[1] != killed[0]
    assert fleet.continuations() == 1


def test_ndjson(fleet: Fleet) -> None:
    killed: list[str] = []
    text, done, generated_by = "", None, set()
    with httpx.stream(
        "POST",
        f"{fleet.cluster.inference_url}/api/v1/continue_from_raw_prompt",
        json={"raw_prompt": "hello world", "max_tokens": MAX_TOKENS},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                continue
            envelope = json.loads(line)
            assert "Response" in envelope, envelope
            generated_by.add(envelope["Response"]["generated_by"])
            token = envelope["Response"]["response"]["GeneratedToken"]
            if "ContentToken" in token:
                text += token["ContentToken"]
                _kill_after(fleet, text, killed)
            else:
                done = token["Done"]
    assert text == WHOLE
    assert done is not None and done["usage"]["content_tokens"] == MAX_TOKENS
    assert killed[0] in generated_by and len(generated_by) == 2
    assert fleet.continuations() == 1


def test_websocket(fleet: Fleet) -> None:
    killed: list[str] = []
    text, done = "", None
    url = fleet.cluster.inference_url.replace("http://", "ws://") + "/api/v1/inference_socket"
    with connect(url) as socket:
        socket.send(
            json.dumps(
                {
                    "Request": {
                        "id": "story",
                        "request": {
                            "ContinueFromConversationHistory": {
                                "conversation_history": [{"role": "user", "content": "a story"}],
                                "max_tokens": MAX_TOKENS,
                            }
                        },
                    }
                }
            )
        )
        while done is None:
            message: dict[str, Any] = json.loads(socket.recv(timeout=20))
            assert "Response" in message, message
            token = message["Response"]["response"]["GeneratedToken"]
            if "ContentToken" in token:
                text += token["ContentToken"]
                _kill_after(fleet, text, killed)
            else:
                done = token["Done"]
    assert text == WHOLE
    assert done["usage"]["content_tokens"] == MAX_TOKENS
    assert fleet.continuations() == 1


def test_openai_sse(fleet: Fleet) -> None:
    killed: list[str] = []
    sdk = openai.OpenAI(
        base_url=f"{fleet.cluster.openai_url}/v1", api_key="unused", max_retries=0, timeout=30
    )
    stream = sdk.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "a story"}],
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        _kill_after(fleet, text, killed)
    assert text == WHOLE
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == MAX_TOKENS
    assert fleet.continuations() == 1


def test_a_stream_moves_again_when_its_second_agent_dies_too(fleet: Fleet) -> None:
    text = ""
    for event in fleet.client.continue_from_raw_prompt("hello world", max_tokens=MAX_TOKENS):
        if isinstance(event, Tokens):
            text += "".join(event.pieces)
            if len(fleet.killed) < 2 and text.count(" ") >= 5 + 20 * len(fleet.killed):
                fleet.kill_busy()
        else:
            assert not isinstance(event, Done) or text == WHOLE
    assert text == WHOLE and len(fleet.killed) == 2
    assert fleet.continuations() == 2


def test_past_max_continuations_the_client_gets_502(make_cluster) -> None:
    cluster = make_cluster(heartbeat_interval=200, max_continuations=1)
    cluster.start_balancer()
    client = cluster.client()
    for index in range(3):
        cluster.start_agent(f"agent{index}", slots=1, step_ms=15)
    cluster.wait_for_agents(client, 3)
    events: list[Any] = []
    killed, serving, since = 0, None, 0
    for event in client.continue_from_raw_prompt("hello world", max_tokens=MAX_TOKENS):
        events.append(event)
        if isinstance(event, Dispatched):
            serving, since = event.agent_name, 0
        elif isinstance(event, Tokens):
            since += 1
            if since == 3:
                cluster.agents[str(serving)].signal(signal.SIGKILL)
                killed += 1
    last = events[-1]
    assert killed == 2
    assert (getattr(last, "code", None), getattr(last, "kind", None)) == (502, "AgentLost")
