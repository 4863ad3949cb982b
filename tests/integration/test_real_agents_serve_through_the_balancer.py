"""``paddler agent`` processes with the real llama.cpp engine and a tiny model."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from paddler.client import AsyncClient, Done, Failed, Tokens
from paddler.testing.cluster import LocalCluster, wait_until
from paddler.testing.tiny_model import write_tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("models")
    return write_tiny_llama(folder / "a.gguf"), write_tiny_llama(folder / "b.gguf", seed=3)


def _state(model: Path) -> dict:
    return {
        "model": {"LocalToAgent": str(model)},
        "inference_parameters": {"context_size": 512, "temperature": 0.0},
    }


def _ready(cluster: LocalCluster, count: int, model: Path) -> None:
    client = cluster.client()
    wait_until(
        lambda: (
            len(agents := client.agents()) == count
            and all(a["ready"] and a["model_path"] == str(model) for a in agents)
        ),
        timeout_s=20,
        what=f"{count} agents ready with {model.name}",
    )


def test_concurrent_requests_on_one_agent_interleave_their_tokens(make_cluster, models) -> None:
    cluster = make_cluster()
    cluster.start_balancer()
    cluster.start_real_agent("llama", slots=4)
    cluster.client().put_desired_state(_state(models[0]))
    _ready(cluster, 1, models[0])
    arrivals: dict[int, list[float]] = {}

    async def run() -> None:
        async with await AsyncClient.connect(cluster.clients_addr) as client:

            async def one(index: int) -> None:
                stream = await client.continue_from_raw_prompt(f"story {index}", max_tokens=400)
                async for event in stream:
                    if isinstance(event, Tokens):
                        arrivals.setdefault(index, []).append(time.monotonic())
                    elif isinstance(event, Failed):
                        raise AssertionError(event)
                    elif isinstance(event, Done):
                        assert event.usage.content_tokens == 400

            await asyncio.gather(*(one(i) for i in range(4)))

    asyncio.run(run())
    assert sorted(arrivals) == [0, 1, 2, 3]
    # they ran together: the token spans overlap (on a loaded machine the test's own
    # process may submit one request late enough for it to run alone: at most one)
    spans = sorted((min(times), max(times)) for times in arrivals.values())
    overlapping = [
        (a, b) for i, a in enumerate(spans) for b in spans[i + 1 :] if b[0] < a[1] and a[0] < b[1]
    ]
    assert len(overlapping) >= 3, spans  # at least three of the four together


def test_a_missing_model_file_shows_up_as_an_issue_in_the_agent_list(
    make_cluster, tmp_path
) -> None:
    cluster = make_cluster()
    cluster.start_balancer()
    cluster.start_real_agent("llama", slots=1)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)
    missing = tmp_path / "missing.gguf"
    client.put_desired_state({"model": {"LocalToAgent": str(missing)}})
    agent = wait_until(
        lambda: (a := client.agents()) and a[0]["issues"] and a[0],
        timeout_s=10,
        what="issue reported",
    )
    assert agent["issues"] == [{"ModelFileDoesNotExist": {"model_path": str(missing)}}]
    assert agent["state_application_status"] == "AttemptedAndNotAppliable"
    assert not agent["ready"]
    assert cluster.agents["llama"].alive()


def test_a_model_swap_under_load_drops_no_request(make_cluster, models) -> None:
    cluster = make_cluster(buffered_request_timeout=30_000)
    cluster.start_balancer()
    cluster.start_real_agent("llama", slots=2)
    first, second = models
    control = cluster.client()
    control.put_desired_state(_state(first))
    _ready(cluster, 1, first)
    results: list[str] = []

    async def run() -> None:
        async with await AsyncClient.connect(cluster.clients_addr, timeout_s=30) as client:

            async def one(index: int) -> None:
                await asyncio.sleep(index * 0.02)
                stream = await client.continue_from_raw_prompt(f"p{index}", max_tokens=60)
                async for event in stream:
                    if isinstance(event, Done):
                        results.append("done")
                    elif isinstance(event, Failed):
                        results.append(f"{event.code} {event.kind}")

            async def swap() -> None:
                await asyncio.sleep(0.15)
                await client.put_desired_state(_state(second))

            await asyncio.gather(swap(), *(one(i) for i in range(8)))

    asyncio.run(run())
    assert results == ["done"] * 8
    _ready(cluster, 1, second)
