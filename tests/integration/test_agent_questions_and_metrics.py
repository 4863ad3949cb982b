from __future__ import annotations

import pytest

from paddler.errors import RequestFailed


def test_agents_answer_questions_about_themselves_through_the_broker(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start_balancer()
    cluster.start_agent("a1")
    client = cluster.client()
    [agent] = cluster.wait_for_agents(client, 1)

    metadata = client.agent_info(agent["id"], "model_metadata")
    assert metadata == {"metadata": {"general.architecture": "fake", "general.name": "fake engine"}}
    assert client.agent_info(agent["id"], "chat_template_override") is None
    client.put_desired_state(
        {"chat_template_override": "{{ messages }}", "use_chat_template_override": True}
    )
    assert client.agent_info(agent["id"], "chat_template_override") == {"content": "{{ messages }}"}
    with pytest.raises(RequestFailed) as error:
        client.agent_info("no-such-agent", "model_metadata")
    assert (error.value.code, error.value.kind) == (404, "UnknownAgent")


def test_metrics_move_when_requests_run(make_cluster) -> None:
    cluster = make_cluster(max_buffered_requests=0)
    cluster.start_balancer()
    cluster.start_agent("a1", slots=1)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    before = client.metrics()["metrics"]
    assert before["requests"] == {}
    client.continue_from_raw_prompt("x", max_tokens=5).text()
    running = client.continue_from_raw_prompt("y", max_tokens=100_000)
    next(iter(running))
    overflow = list(client.continue_from_raw_prompt("z", max_tokens=5))
    assert overflow[-1].kind == "BufferOverflow"
    running.cancel()
    after = client.metrics()
    metrics = after["metrics"]
    assert metrics["requests"]["done"] == 1
    assert metrics["requests"]["BufferOverflow"] == 1
    assert metrics["tokens_by_agent"]["a1"] == 5
    assert metrics["time_to_first_token_seconds"]["count"] >= 1
    assert metrics["inter_token_seconds"]["count"] >= 4
    assert metrics["queue_wait_seconds"]["count"] >= 2
    assert after["agents"][0]["name"] == "a1"
