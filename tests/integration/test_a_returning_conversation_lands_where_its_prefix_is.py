"""The ``prefix`` dispatch policy with real llama.cpp agents: two conversations
alternate over three agents, and each returning turn lands on the agent that served
its previous turn, where it finds its history already computed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from paddler.client import Dispatched, Done, Tokens
from paddler.testing.cluster import LocalCluster, wait_until
from paddler.testing.tiny_model import write_tiny_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


def _turn(cluster: LocalCluster, history: list[dict[str, str]]) -> tuple[str, str, Any]:
    """The agent that served one turn, its answer and usage."""
    agent, text, usage = "", "", None
    request = {"conversation_history": history, "max_tokens": 12, "temperature": 0.0}
    for event in cluster.client().submit(request):
        if isinstance(event, Dispatched):
            agent = str(event.agent_name)
        elif isinstance(event, Tokens):
            text += "".join(event.pieces)
        else:
            assert isinstance(event, Done), event
            usage = event.usage
    return agent, text, usage


@pytest.mark.parametrize("policy", ["prefix", "slots"])
def test_each_returning_turn_lands_on_the_agent_that_served_the_last(
    make_cluster: Any, model: Path, policy: str
) -> None:
    cluster = make_cluster(dispatch_policy=policy)
    cluster.start_balancer()
    for name in ("one", "two", "three"):
        cluster.start_real_agent(name, slots=1)
    client = cluster.client()
    client.put_desired_state(
        {"model": {"LocalToAgent": str(model)}, "inference_parameters": {"context_size": 1024}}
    )
    wait_until(
        lambda: len(agents := client.agents()) == 3 and all(a["ready"] for a in agents),
        timeout_s=30,
        what="three ready agents",
    )
    system = {"role": "system", "content": "You answer briefly. " * 20}
    conversations = {
        name: [system, {"role": "user", "content": f"Tell me about {name}"}]
        for name in ("the sea", "the mountains")
    }
    served: dict[str, list[str]] = {name: [] for name in conversations}
    cached: list[int] = []
    for _ in range(4):
        for name, history in conversations.items():
            agent, answer, usage = _turn(cluster, history)
            served[name].append(agent)
            if len(served[name]) > 1:
                cached.append(usage.cached_prompt_tokens)
            history += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "Go on."},
            ]
    if policy == "prefix":
        for agents in served.values():
            assert len(set(agents)) == 1, served  # every turn where the last one was
        assert all(tokens > 100 for tokens in cached), cached
    else:
        # the slots policy sends each request to the agent idle longest: turns wander
        assert any(len(set(agents)) > 1 for agents in served.values()), served
