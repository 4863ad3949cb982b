"""Real llama.cpp agents: a greedy stream whose agent is frozen and then killed
mid-stream continues on the other agent and gives exactly the tokens of an
uninterrupted run; a seeded one keeps its seed and ends normally."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from paddler.client import Dispatched, Done, Tokens
from paddler.testing.cluster import LocalCluster, wait_until
from paddler.testing.tiny_model import write_tiny_llama

MAX_TOKENS = 1500


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


def _cluster(make_cluster: Any, model: Path) -> LocalCluster:
    cluster = make_cluster(heartbeat_interval=200)
    cluster.start_balancer()
    for name in ("left", "right"):
        cluster.start_real_agent(name, slots=1)
    client = cluster.client()
    client.put_desired_state(
        {
            "model": {"LocalToAgent": str(model)},
            "inference_parameters": {"context_size": 2048, "temperature": 0.0},
        }
    )
    wait_until(
        lambda: len(agents := client.agents()) == 2 and all(a["ready"] for a in agents),
        timeout_s=30,
        what="two agents ready",
    )
    return cluster


def _stream(
    cluster: LocalCluster, request: dict[str, Any], kill_after: int | None
) -> tuple[str, Any, list[str | None]]:
    """The text and usage of one request; with ``kill_after``, the agent serving it
    is frozen (SIGSTOP: it sends nothing more) once that many token frames arrived,
    then killed."""
    client = cluster.client(timeout_s=30)
    text, usage, agents, frames = "", None, [], 0
    for event in client.submit(request):
        if isinstance(event, Dispatched):
            agents.append(event.agent_name)
        elif isinstance(event, Tokens):
            text += "".join(event.pieces)
            frames += 1
            if frames == kill_after:
                agent = cluster.agents[str(agents[-1])]
                agent.signal(signal.SIGSTOP)
                agent.signal(signal.SIGKILL)
        else:
            assert isinstance(event, Done), event
            usage = event.usage
    return text, usage, agents


def test_a_greedy_stream_continued_elsewhere_is_token_for_token_the_same(
    make_cluster: Any, model: Path
) -> None:
    cluster = _cluster(make_cluster, model)
    request = {"raw_prompt": "Once upon a time", "max_tokens": MAX_TOKENS}
    reference, reference_usage, _ = _stream(cluster, request, None)
    assert reference_usage.content_tokens == MAX_TOKENS, "the reference ended early"
    text, usage, agents = _stream(cluster, request, 10)
    assert len(agents) == 2 and agents[0] != agents[1]  # it did move
    assert text == reference
    # the same usage (what a slot had cached of the prompt may differ)
    assert replace(usage, cached_prompt_tokens=0) == replace(
        reference_usage, cached_prompt_tokens=0
    )


def test_a_seeded_stream_continued_elsewhere_ends_normally(make_cluster: Any, model: Path) -> None:
    cluster = _cluster(make_cluster, model)
    request = {
        "raw_prompt": "Once upon a time",
        "max_tokens": 600,
        "temperature": 0.8,
        "seed": 42,
        "stop": ["zzzz"],
    }
    text, usage, agents = _stream(cluster, request, 10)
    assert len(agents) == 2
    assert usage.content_tokens <= 600 and text
