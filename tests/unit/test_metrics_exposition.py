"""``/metrics``: a broker metrics snapshot, as the broker builds it, through
prometheus_client and back through its parser: names, types, labels, values."""

from __future__ import annotations

from typing import Any

import falcon.testing
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from paddler.broker.metrics import BrokerMetrics
from paddler.http import management
from paddler.http.common import HttpDeps
from paddler.protocol.messages import AgentSnapshot
from tests.unit.fake_broker import FakeClient, FakeLink

ODD_NAME = 'quote " backslash \\ newline \n end'


def _snapshot() -> dict[str, Any]:
    metrics = BrokerMetrics()
    for seconds in (0.0005, 0.02, 0.3, 45.0):
        metrics.queue_wait.observe(seconds)
    metrics.time_to_first_token.observe(1.0)  # on a bound: counted in le="1"
    metrics.requests.update({"done": 3, "BufferOverflow": 1})
    metrics.tokens_by_agent.update({"a1": 12, ODD_NAME: 5})
    metrics.requests_by_agent.update({"a1": 3})
    metrics.dropped_frames = 7
    metrics.output_tokens = 41
    agents = [
        AgentSnapshot(id="id-1", name="a1", slots_total=4, slots_processing=1, ready=True),
        AgentSnapshot(id="id-2", name=None, slots_total=2, slots_processing=2),
        AgentSnapshot(id="id-3", name=ODD_NAME, slots_total=1, slots_processing=0, ready=True),
    ]
    return {
        "metrics": metrics.snapshot(),
        "agents": [agent.to_body() for agent in agents],
        "buffered": 5,
    }


def _families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _values(family: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for sample in family.samples
    }


def test_paddlers_three_gauges_keep_their_names() -> None:
    families = _families(management.render_metrics(_snapshot()))
    assert [(families[name].type, _values(families[name])) for name in (
        "paddler_slots_processing", "paddler_slots_total", "paddler_requests_buffered"
    )] == [
        ("gauge", {("paddler_slots_processing", ()): 3}),
        ("gauge", {("paddler_slots_total", ()): 7}),
        ("gauge", {("paddler_requests_buffered", ()): 5}),
    ]  # fmt: skip
    assert _values(families["paddler_agents"]) == {("paddler_agents", ()): 3}


def test_every_family_and_its_exposed_sample_names() -> None:
    text = management.render_metrics(_snapshot())
    exposed = {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")
    }
    assert exposed == {
        "paddler_slots_processing": "gauge",
        "paddler_slots_total": "gauge",
        "paddler_requests_buffered": "gauge",
        "paddler_agents": "gauge",
        "paddler_agent_slots_processing": "gauge",
        "paddler_agent_slots_total": "gauge",
        "paddler_agent_ready": "gauge",
        "paddler_requests_total": "counter",
        "paddler_agent_requests_total": "counter",
        "paddler_generated_tokens_total": "counter",
        "paddler_output_tokens_streamed_total": "counter",
        "paddler_dropped_frames_total": "counter",
        "paddler_continuations_total": "counter",
        "paddler_queue_wait_seconds": "histogram",
        "paddler_time_to_first_token_seconds": "histogram",
        "paddler_inter_token_latency_seconds": "histogram",
    }
    samples = {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1] != "#"}
    assert "paddler_requests_total" in samples and "paddler_requests" not in samples
    assert not any(name.endswith("_created") for name in samples)


def test_per_agent_gauges_are_labelled_by_name_and_id() -> None:
    families = _families(management.render_metrics(_snapshot()))
    labels = (
        (("agent", "a1"), ("id", "id-1")),
        (("agent", "id-2"), ("id", "id-2")),  # no name: the id stands in
        (("agent", ODD_NAME), ("id", "id-3")),  # escaped on the way out, intact on the way in
    )
    for name, values in (
        ("paddler_agent_slots_processing", (1, 2, 0)),
        ("paddler_agent_slots_total", (4, 2, 1)),
        ("paddler_agent_ready", (1, 0, 1)),
    ):
        assert _values(families[name]) == {
            (name, label): value for label, value in zip(labels, values, strict=True)
        }


def test_counters_by_outcome_and_agent() -> None:
    families = _families(management.render_metrics(_snapshot()))
    assert _values(families["paddler_requests"]) == {
        ("paddler_requests_total", (("outcome", "BufferOverflow"),)): 1,
        ("paddler_requests_total", (("outcome", "done"),)): 3,
    }
    assert _values(families["paddler_agent_requests"]) == {
        ("paddler_agent_requests_total", (("agent", "a1"),)): 3
    }
    assert _values(families["paddler_generated_tokens"]) == {
        ("paddler_generated_tokens_total", (("agent", "a1"),)): 12,
        ("paddler_generated_tokens_total", (("agent", ODD_NAME),)): 5,
    }
    assert _values(families["paddler_dropped_frames"]) == {("paddler_dropped_frames_total", ()): 7}
    assert _values(families["paddler_output_tokens_streamed"]) == {
        ("paddler_output_tokens_streamed_total", ()): 41
    }


def test_histograms_keep_their_buckets_sum_and_count() -> None:
    snapshot = _snapshot()
    families = _families(management.render_metrics(snapshot))
    queue = _values(families["paddler_queue_wait_seconds"])
    assert queue[("paddler_queue_wait_seconds_bucket", (("le", "0.001"),))] == 1
    assert queue[("paddler_queue_wait_seconds_bucket", (("le", "0.025"),))] == 2
    assert queue[("paddler_queue_wait_seconds_bucket", (("le", "30"),))] == 3
    assert queue[("paddler_queue_wait_seconds_bucket", (("le", "+Inf"),))] == 4
    assert queue[("paddler_queue_wait_seconds_count", ())] == 4
    assert queue[("paddler_queue_wait_seconds_sum", ())] == 45.3205
    bounds = [dict(labels)["le"] for (name, labels) in queue if name.endswith("_bucket")]
    assert bounds == [f"{b:g}" for b in snapshot["metrics"]["queue_wait_seconds"]["buckets"]] + [
        "+Inf"
    ]
    first_token = _values(families["paddler_time_to_first_token_seconds"])
    assert first_token[("paddler_time_to_first_token_seconds_bucket", (("le", "0.5"),))] == 0
    assert first_token[("paddler_time_to_first_token_seconds_bucket", (("le", "1"),))] == 1
    empty = _values(families["paddler_inter_token_latency_seconds"])
    assert empty[("paddler_inter_token_latency_seconds_count", ())] == 0
    assert empty[("paddler_inter_token_latency_seconds_sum", ())] == 0


def test_no_agents_and_no_requests_still_name_every_family() -> None:
    snapshot = {"metrics": BrokerMetrics().snapshot(), "agents": [], "buffered": 0}
    families = _families(management.render_metrics(snapshot))
    assert len(families) == 16
    assert _values(families["paddler_slots_total"]) == {("paddler_slots_total", ()): 0}
    assert _values(families["paddler_agent_ready"]) == {}
    assert _values(families["paddler_requests"]) == {}


def test_scrapes_share_no_registry() -> None:
    first = management.render_metrics(_snapshot())
    assert management.render_metrics(_snapshot()) == first  # nothing piles up between scrapes
    assert "paddler_" not in prometheus_client.generate_latest().decode()


def test_the_route_serves_the_text_format() -> None:
    deps = HttpDeps(link=FakeLink(FakeClient()))  # type: ignore[arg-type]
    result = falcon.testing.TestClient(management.create_app(deps)).simulate_get("/metrics")
    assert result.status_code == 200
    assert result.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = _families(result.text)
    assert _values(families["paddler_slots_processing"]) == {("paddler_slots_processing", ()): 1}
    assert _values(families["paddler_agent_ready"]) == {
        ("paddler_agent_ready", (("agent", "a1"), ("id", "agent-x"))): 1
    }
