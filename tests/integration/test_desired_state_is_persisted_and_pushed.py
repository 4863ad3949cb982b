from __future__ import annotations

import pytest

from paddler.client import Client
from paddler.errors import ConfigurationError
from paddler.testing.cluster import wait_until


def test_desired_state_survives_a_restart_and_reaches_every_agent(make_cluster, tmp_path) -> None:
    database = tmp_path / "state.sqlite"
    cluster = make_cluster(state_database=str(database))
    first = cluster.start_balancer("balancer-1")
    cluster.start_agent("a1")
    with Client(cluster.clients_addr) as client:
        cluster.wait_for_agents(client, 1)
        assert client.applicable_state() is None
        assert client.desired_state()["model"] == "None"
        client.put_desired_state(
            {
                "model": {"LocalToAgent": "/models/x.gguf"},
                "inference_parameters": {"temperature": 0.2},
            }
        )
        wait_until(
            lambda: client.agents()[0]["model_path"] == "/models/x.gguf", what="state applied"
        )
        with pytest.raises(ConfigurationError) as error:
            client.put_desired_state({"inference_parameters": {"top_k": -3}})
        assert error.value.field == "inference_parameters.top_k"
        with pytest.raises(ConfigurationError) as error:
            client.put_desired_state({"modle": "None"})
        assert error.value.field == "modle"
    first.stop()

    cluster.start_balancer("balancer-2")
    cluster.start_agent("a2")
    with Client(cluster.clients_addr, timeout_s=10) as client:
        state = client.desired_state()
        assert state["model"] == {"LocalToAgent": "/models/x.gguf"}
        assert state["inference_parameters"]["temperature"] == 0.2
        assert client.applicable_state() == state
        agents = cluster.wait_for_agents(client, 2)
        wait_until(
            lambda: all(a["model_path"] == "/models/x.gguf" for a in client.agents()),
            what="both agents got the stored state",
        )
        assert {a["state_application_status"] for a in agents} == {"Applied"}
