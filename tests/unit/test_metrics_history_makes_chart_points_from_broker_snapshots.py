"""The charts' data: ``paddler.http.metrics_history`` turns broker metrics snapshots
into chart points (rates, TTFT quantiles, gauges), keeps 15 minutes of them, and
``/api/v1/metrics/stream`` sends them (through ``falcon.testing``, a fake broker)."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import falcon.testing
import pytest

from paddler.errors import BrokerUnreachable
from paddler.http import management, metrics_history
from paddler.http.asgi import DISCONNECTED
from paddler.http.common import HttpDeps
from paddler.http.metrics_history import (
    MAX_CHART_AGENTS,
    OTHER_AGENTS,
    MetricsHistory,
    chart_point,
    counter_delta,
    histogram_delta,
    quantile,
)
from tests.unit.fake_broker import AGENT, FakeClient, FakeLink
from tests.unit.test_sse_writer import parse

BOUNDS = [0.01, 0.1, 1.0]


def histogram(*cumulative: int) -> dict[str, Any]:
    return {"buckets": BOUNDS, "cumulative": list(cumulative), "count": cumulative[-1], "sum": 0}


def snapshot(
    tokens: int,
    requests: dict[str, int],
    ttft: dict[str, Any],
    agents: list[dict[str, Any]] | None = None,
    buffered: int = 0,
) -> dict[str, Any]:
    return {
        "agents": agents if agents is not None else [AGENT],
        "buffered": buffered,
        "metrics": {
            "output_tokens_streamed": tokens,
            "requests": requests,
            "time_to_first_token_seconds": ttft,
        },
    }


def test_quantiles_interpolate_within_their_bucket_as_prometheus_does() -> None:
    # 10 observations: 2 under 10 ms, 6 between 10 and 100 ms, 2 between 100 ms and 1 s
    cumulative = [2, 8, 10, 10]
    assert quantile(0.5, BOUNDS, cumulative) == pytest.approx(0.01 + 0.09 * 3 / 6)
    assert quantile(0.1, BOUNDS, cumulative) == pytest.approx(0.005)
    assert quantile(0.99, BOUNDS, cumulative) == pytest.approx(0.1 + 0.9 * 1.9 / 2)
    assert quantile(0.5, BOUNDS, [0, 0, 0, 0]) is None
    assert quantile(0.99, BOUNDS, [0, 0, 0, 5]) == 1.0  # all in +Inf: the highest bound


def test_counters_that_went_down_count_from_zero_again() -> None:
    assert counter_delta({"a": 5, "b": 2, "c": 1}, {"a": 3, "b": 7}) == {"a": 2, "b": 2, "c": 1}
    assert counter_delta({"a": 3}, {"a": 3}) == {}
    assert histogram_delta(histogram(1, 2, 3, 3), histogram(1, 1, 1, 1)) == [0, 1, 2, 2]
    assert histogram_delta(histogram(1, 1, 1, 1), histogram(2, 2, 2, 2)) == [1, 1, 1, 1]
    assert histogram_delta(histogram(1, 1, 1, 1), None) == [1, 1, 1, 1]


def test_a_chart_point_has_rates_quantiles_and_gauges() -> None:
    before = snapshot(100, {"done": 4}, histogram(0, 1, 1, 1))
    busy = {**AGENT, "slots_processing": 3}
    after = snapshot(
        160,
        {"done": 8, "cancelled": 2},
        histogram(0, 5, 5, 5),
        agents=[busy],
        buffered=4,
    )
    point = chart_point(before, after, elapsed_s=2.0, at=1000.0)
    assert point["t"] == 1000.0 and point["dt_s"] == 2.0
    assert point["tokens_per_s"] == 30.0
    assert point["requests_per_s"] == {"cancelled": 1.0, "done": 2.0}
    # the 4 first tokens of this interval all fell between 10 and 100 ms
    assert 0.01 < point["ttft_p50_s"] < point["ttft_p99_s"] <= 0.1
    assert point["buffered"] == 4
    assert point["agents"] == [{"name": "a1", "busy": 3, "total": 4}]
    assert (point["slots_processing"], point["slots_total"]) == (3, 4)
    idle = chart_point(after, after, elapsed_s=2.0, at=1002.0)
    assert idle["ttft_p50_s"] is None and idle["requests_per_s"] == {}
    assert idle["tokens_per_s"] == 0
    restarted = snapshot(50, {}, histogram(0, 0, 0, 0))  # the broker restarted: from zero
    assert chart_point(after, restarted, elapsed_s=2.0, at=1004.0)["tokens_per_s"] == 25.0


def test_a_point_charts_at_most_a_bounded_number_of_agents() -> None:
    agents = [
        {**AGENT, "id": f"id-{i:04d}", "name": f"agent-{i:04d}", "slots_processing": 1}
        for i in range(MAX_CHART_AGENTS + 10)
    ]
    state = snapshot(0, {}, histogram(0, 0, 0, 0), agents=agents)
    point = chart_point(state, state, 2.0, 0.0)
    assert len(point["agents"]) == MAX_CHART_AGENTS + 1
    assert point["agents"][-1] == {"name": OTHER_AGENTS, "busy": 10, "total": 40}
    assert point["slots_processing"] == MAX_CHART_AGENTS + 10


class Broker:
    """Snapshots that grow by 10 tokens and one request per sample; can go away."""

    def __init__(self) -> None:
        self.samples = 0
        self.away = False

    async def fetch(self) -> dict[str, Any]:
        if self.away:
            raise BrokerUnreachable("gone")
        self.samples += 1
        n = self.samples
        return snapshot(10 * n, {"done": n}, histogram(0, n, n, n))


def test_the_history_keeps_a_window_of_points_and_leaves_gaps_when_the_broker_is_away() -> None:
    broker = Broker()
    now = [0.0]
    history = MetricsHistory(broker.fetch, interval_s=2.0, window_s=10.0, clock=lambda: now[0])

    async def run() -> None:
        assert await history.sample() is None  # the first sample only seeds the rates
        for _ in range(7):
            now[0] += 2.0
            point = await history.sample()
            assert point is not None and point["tokens_per_s"] == 5.0
        broker.away = True
        now[0] += 2.0
        assert await history.sample() is None
        broker.away = False
        now[0] += 2.0
        assert await history.sample() is None  # seeds again after the gap

    asyncio.run(run())
    assert len(history.points) == 5  # window_s / interval_s
    assert history.appended == 7
    assert [p["t"] for p in history.since(5)] == [12.0, 14.0]
    assert history.since(7) == [] and len(history.since(0)) == 5
    assert "5 points, every 2 s, stopped" in repr(history)


def _stream_events(app: Any, wanted: int) -> list[dict[str, Any]]:
    gone = asyncio.Event()
    seen: list[bytes] = []

    async def run() -> None:
        async with (
            falcon.testing.ASGIConductor(app) as conductor,
            conductor.simulate_get_stream(
                "/api/v1/metrics/stream", extras={DISCONNECTED: gone}
            ) as result,
        ):
            assert result.headers["content-type"] == "text/event-stream"
            while len(parse(b"".join(seen))[0]) < wanted:
                seen.append(await asyncio.wait_for(result.stream.read(), 5))
            gone.set()

    asyncio.run(run())
    return [json.loads(event) for event in parse(b"".join(seen))[0]]


def test_the_metrics_stream_sends_the_history_then_each_new_point(monkeypatch) -> None:
    monkeypatch.setattr(metrics_history, "SAMPLE_INTERVAL_S", 0.05)
    fake = FakeClient()
    snapshots = iter(range(1, 1000))
    original = fake.metrics

    async def growing() -> dict[str, Any]:
        value = copy.deepcopy(await original())
        n = next(snapshots)
        value["metrics"]["requests"] = {"done": n}
        return value

    fake.metrics = growing  # type: ignore[method-assign]
    app = management.create_app(HttpDeps(link=FakeLink(fake)))  # type: ignore[arg-type]
    first, second, third = _stream_events(app, 3)
    assert first["interval_s"] == 0.05 and first["window_s"] == 900
    assert isinstance(first["points"], list)
    for event in (second, third):
        (point,) = event["points"]
        assert point["requests_per_s"]["done"] > 0
        assert point["agents"] == [{"name": "a1", "busy": 1, "total": 4}]
