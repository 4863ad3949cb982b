"""The HTTP services of ``paddler balancer`` (gunicorn + Falcon) with fake-engine agents."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from paddler.testing.cluster import LocalCluster, free_port, wait_until
from paddler.testing.processes import descends_from, live_processes


def _cluster(make_cluster, **options) -> LocalCluster:
    cluster = make_cluster(**options)
    cluster.start_balancer()
    cluster.wait_for_http()
    return cluster


def _lines(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line]


def test_management_routes_are_not_reachable_on_the_inference_address(make_cluster) -> None:
    cluster = _cluster(make_cluster)
    assert httpx.get(f"{cluster.management_url}/api/v1/agents").json() == {"agents": []}
    for url in (cluster.inference_url, cluster.management_url):
        health = httpx.get(f"{url}/health")
        assert (health.status_code, health.text) == (200, "OK")
    for path in ("/api/v1/agents", "/api/v1/balancer_desired_state", "/metrics"):
        assert httpx.get(f"{cluster.inference_url}{path}").status_code == 404
    assert (
        httpx.post(
            f"{cluster.management_url}/api/v1/continue_from_raw_prompt", json={"raw_prompt": "x"}
        ).status_code
        == 404
    )


def test_an_ndjson_stream_carries_paddler_envelopes(make_cluster) -> None:
    cluster = _cluster(make_cluster)
    cluster.start_agent("a1", slots=1)
    cluster.wait_for_agents(cluster.client(), 1)
    with httpx.stream(
        "POST",
        f"{cluster.inference_url}/api/v1/continue_from_raw_prompt",
        json={"raw_prompt": "hello world", "max_tokens": 3},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        lines = _lines(response)
    request_ids = {line["Response"]["request_id"] for line in lines}
    assert len(request_ids) == 1
    assert all(line["Response"]["generated_by"] == "a1" for line in lines)
    tokens = [line["Response"]["response"]["GeneratedToken"] for line in lines]
    assert tokens[:3] == [{"ContentToken": "t0 "}, {"ContentToken": "t1 "}, {"ContentToken": "t2 "}]
    usage = tokens[3]["Done"]["usage"]
    assert usage["content_tokens"] == 3 and usage["prompt_tokens"] == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"raw_prompt": "x",', "body"),
        (b'{"raw_prompt": "x", "max_tokens": 0}', "max_tokens"),
        (b'{"raw_prompt": "x", "max_tokenz": 5}', "max_tokenz"),
        (b'{"raw_prompt": 5}', "raw_prompt"),
        (b'["raw_prompt"]', "body"),
        (b'{"max_tokens": 5}', "raw_prompt"),
    ],
)
def test_bad_bodies_get_400_naming_the_field(make_cluster, body: bytes, field: str) -> None:
    cluster = _cluster(make_cluster)
    response = httpx.post(
        f"{cluster.inference_url}/api/v1/continue_from_raw_prompt",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["field"] == field


def test_empty_conversations_and_oversized_bodies_are_refused(make_cluster) -> None:
    cluster = _cluster(make_cluster, max_request_body_bytes=4096)
    url = f"{cluster.inference_url}/api/v1/continue_from_conversation_history"
    empty = httpx.post(url, json={"conversation_history": [], "max_tokens": 5})
    assert empty.status_code == 400 and empty.json()["field"] == "conversation_history"
    huge = httpx.post(url, json={"conversation_history": [{"role": "user", "content": "x" * 5000}]})
    assert huge.status_code == 413


def test_buffer_overflow_and_timeout_come_back_in_band(make_cluster) -> None:
    cluster = _cluster(make_cluster, max_buffered_requests=1, buffered_request_timeout=300)
    cluster.start_agent("busy", slots=1, step_ms=20)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)
    url = f"{cluster.inference_url}/api/v1/continue_from_raw_prompt"
    with httpx.stream("POST", url, json={"raw_prompt": "long", "max_tokens": 100_000}) as busy:
        busy_lines = busy.iter_lines()  # keep it: dropping the iterator closes the response
        next(busy_lines)
        results: dict[str, list[dict]] = {}

        def waits() -> None:
            response = httpx.post(url, json={"raw_prompt": "waits", "max_tokens": 2}, timeout=10)
            results["timeout"] = _lines(response)

        waiter = threading.Thread(target=waits)
        waiter.start()
        wait_until(lambda: client.buffered_requests() == 1, what="one buffered")
        overflow = httpx.post(url, json={"raw_prompt": "overflow", "max_tokens": 2})
        waiter.join(10)
    assert overflow.status_code == 200
    [line] = _lines(overflow)
    assert line["Error"]["error"] == {"code": 503, "description": "Buffered requests overflow"}
    [line] = results["timeout"]
    assert line["Error"]["error"]["code"] == 504


def test_a_client_that_disconnects_mid_stream_frees_its_slot(make_cluster) -> None:
    cluster = _cluster(make_cluster)
    cluster.start_agent("a1", slots=1, step_ms=10)
    cluster.wait_for_agents(cluster.client(), 1)
    seen: list[list[int]] = []
    freed = threading.Event()

    def watch() -> None:
        with httpx.stream(
            "GET", f"{cluster.management_url}/api/v1/agents/stream", timeout=20
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for raw in response.iter_lines():
                if raw.startswith("data:"):
                    agents = json.loads(raw[5:])["agents"]
                    seen.append([a["slots_processing"] for a in agents])
                    if seen[-1] == [0] and [1] in seen:
                        freed.set()
                        return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_until(lambda: seen, what="first SSE event")
    with httpx.stream(
        "POST",
        f"{cluster.inference_url}/api/v1/continue_from_raw_prompt",
        json={"raw_prompt": "long", "max_tokens": 100_000},
    ) as response:
        lines = response.iter_lines()
        next(lines)
        wait_until(lambda: [1] in seen, what="the SSE stream shows the busy slot")
        next(lines)
    # the connection closed with the block: the agent's slot frees
    assert freed.wait(10), seen
    watcher.join(5)


@pytest.mark.parametrize("service", ["ndjson", "openai_sse"])
def test_a_client_that_leaves_while_buffered_leaves_the_buffer(make_cluster, service) -> None:
    """Nothing is written to a buffered request's connection, so only the watch on
    the connection can notice the client leaving: its request leaves the buffer."""
    cluster = _cluster(
        make_cluster,
        compat_openai_addr=f"127.0.0.1:{free_port()}",
        buffered_request_timeout=60_000,
    )
    cluster.start_agent("a1", slots=1, step_ms=10)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)
    busy = client.continue_from_raw_prompt("hold the slot", max_tokens=100_000)
    wait_until(lambda: client.agents()[0]["slots_processing"] == 1, what="the slot busy")
    if service == "ndjson":
        url = f"{cluster.inference_url}/api/v1/continue_from_raw_prompt"
        body: dict = {"raw_prompt": "wait", "max_tokens": 4}
    else:
        url = f"{cluster.openai_url}/v1/completions"
        body = {"model": "m", "prompt": "wait", "max_tokens": 4, "stream": True}
    timeout = httpx.Timeout(10, read=1.0)
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream("POST", url, json=body, timeout=timeout) as r,
    ):
        wait_until(lambda: client.buffered_requests() == 1, what="buffered")
        r.read()
    # the connection closed with the block: the request leaves the buffer
    wait_until(lambda: client.buffered_requests() == 0, timeout_s=1.5, what="the buffer empty")
    assert client.agents()[0]["slots_processing"] == 1  # the slot never freed: not that
    busy.cancel()


def test_the_websocket_multiplexes_requests_and_stops_one_on_request(make_cluster) -> None:
    cluster = _cluster(make_cluster)
    cluster.start_agent("a1", slots=4, step_ms=10)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)
    url = cluster.inference_url.replace("http://", "ws://") + "/api/v1/inference_socket"
    with connect(url) as first, connect(url) as second:
        for socket in (first, second):  # the same id on two connections: no collision
            socket.send(
                json.dumps(
                    {
                        "Request": {
                            "id": "same",
                            "request": {
                                "ContinueFromRawPrompt": {"raw_prompt": "x", "max_tokens": 3}
                            },
                        }
                    }
                )
            )
        first.send(
            json.dumps(
                {
                    "Request": {
                        "id": "endless",
                        "request": {
                            "ContinueFromConversationHistory": {
                                "conversation_history": [{"role": "user", "content": "hi"}],
                                "max_tokens": 100_000,
                            }
                        },
                    }
                }
            )
        )
        first.send("not json")
        done: dict[str, int] = {}
        errors = []
        stopped = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and ("same" not in done or not stopped):
            message = json.loads(first.recv(timeout=5))
            if "Error" in message:
                errors.append(message["Error"])
                continue
            response = message["Response"]
            token = response["response"]["GeneratedToken"]
            if "Done" in token:
                done[response["request_id"]] = token["Done"]["usage"]["content_tokens"]
            elif response["request_id"] == "endless" and not stopped:
                first.send(json.dumps({"Notification": {"StopRespondingTo": "endless"}}))
                stopped = True
        assert done == {"same": 3}
        assert errors and errors[0]["error"]["code"] == 400
        second_done = None
        while second_done is None:
            message = json.loads(second.recv(timeout=5))
            token = message["Response"]["response"]["GeneratedToken"]
            if "Done" in token:
                second_done = message["Response"]["request_id"]
        assert second_done == "same"
    wait_until(lambda: client.agents()[0]["slots_processing"] == 0, what="stopped request freed")


def test_metrics_parse_and_move_when_requests_run(make_cluster) -> None:
    cluster = _cluster(make_cluster)
    cluster.start_agent("a1", slots=2)
    cluster.wait_for_agents(cluster.client(), 1)

    def scrape() -> dict[str, float]:
        text = httpx.get(f"{cluster.management_url}/metrics").text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name + json.dumps(sample.labels, sort_keys=True)
                values[key] = sample.value
        return values

    before = scrape()
    assert before["paddler_slots_total{}"] == 2
    assert before["paddler_requests_buffered{}"] == 0
    assert (
        before[
            'paddler_agent_slots_total{"agent": "a1", "id": "'
            + cluster.client().agents()[0]["id"]
            + '"}'
        ]
        == 2
    )
    for _ in range(3):
        httpx.post(
            f"{cluster.inference_url}/api/v1/continue_from_raw_prompt",
            json={"raw_prompt": "x", "max_tokens": 4},
        ).read()
    after = scrape()
    assert after['paddler_requests_total{"outcome": "done"}'] == 3
    assert after['paddler_generated_tokens_total{"agent": "a1"}'] == 12
    assert after["paddler_time_to_first_token_seconds_count{}"] == 3
    assert after["paddler_inter_token_latency_seconds_count{}"] == 9
    assert after['paddler_queue_wait_seconds_bucket{"le": "+Inf"}'] == 3


def test_cors_allows_only_the_listed_origins(make_cluster) -> None:
    cluster = _cluster(make_cluster, inference_cors_allowed_host="https://app.example")
    url = f"{cluster.inference_url}/health"
    allowed = httpx.get(url, headers={"Origin": "https://app.example"})
    assert allowed.headers.get("access-control-allow-origin") == "https://app.example"
    other = httpx.get(url, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    management = httpx.get(
        f"{cluster.management_url}/health", headers={"Origin": "https://app.example"}
    )
    assert "access-control-allow-origin" not in management.headers


def test_sigterm_during_live_streams_ends_them_with_503_and_exits_cleanly(make_cluster) -> None:
    cluster = _cluster(make_cluster)
    cluster.start_agent("a1", slots=2, step_ms=20)
    cluster.wait_for_agents(cluster.client(), 1)
    url = f"{cluster.inference_url}/api/v1/continue_from_raw_prompt"
    results: list[dict] = []

    def stream() -> None:
        with httpx.stream(
            "POST", url, json={"raw_prompt": "x", "max_tokens": 100_000}, timeout=10
        ) as response:
            for line in response.iter_lines():
                if line:
                    results.append(json.loads(line))

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(results) >= 4, what="both streams flowing")
    started = time.monotonic()
    balancer = cluster.balancer
    assert balancer is not None
    balancer.signal(signal.SIGTERM)
    assert balancer.wait(5) == 0
    assert time.monotonic() - started < 5
    for thread in threads:
        thread.join(5)
    errors = [r["Error"]["error"] for r in results if "Error" in r]
    assert errors == [{"code": 503, "description": "balancer is shutting down"}] * 2
    wait_until(lambda: not _gunicorn_alive(balancer.pid), timeout_s=3, what="no gunicorn left")


def _gunicorn_alive(balancer_pid: int) -> bool:
    return any(
        b"gunicorn" in p.cmdline and descends_from(p.pid, balancer_pid) for p in live_processes()
    )


def test_a_crashed_worker_is_replaced_without_losing_broker_state(make_cluster) -> None:
    cluster = _cluster(make_cluster)
    cluster.start_agent("a1", slots=1)
    cluster.wait_for_agents(cluster.client(), 1)
    balancer = cluster.balancer
    assert balancer is not None
    workers = _workers(balancer.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    wait_until(
        lambda: (w := _workers(balancer.pid)) and w != workers, timeout_s=15, what="a new worker"
    )
    cluster.wait_for_http()
    agents = httpx.get(f"{cluster.management_url}/api/v1/agents").json()["agents"]
    assert [a["name"] for a in agents] == ["a1"]
    response = httpx.post(
        f"{cluster.inference_url}/api/v1/continue_from_raw_prompt",
        json={"raw_prompt": "x", "max_tokens": 2},
    )
    assert "Done" in _lines(response)[-1]["Response"]["response"]["GeneratedToken"]


def _workers(balancer_pid: int) -> list[int]:
    """gunicorn worker processes (children of the gunicorn arbiter under the balancer)."""
    return sorted(
        p.pid
        for p in live_processes()
        if b"gunicorn" in p.cmdline
        and p.parent != balancer_pid
        and descends_from(p.parent, balancer_pid)
    )


def test_an_embedding_batch_fans_out_over_the_agents(make_cluster) -> None:
    cluster = _cluster(make_cluster)
    cluster.start_agent("a1", slots=2)
    cluster.start_agent("a2", slots=2)
    cluster.wait_for_agents(cluster.client(), 2)
    documents = [{"id": f"d{i}", "content": "x" * (i + 1)} for i in range(6)]
    response = httpx.post(
        f"{cluster.inference_url}/api/v1/generate_embedding_batch",
        json={"input_batch": documents, "normalization_method": "None"},
    )
    lines = _lines(response)
    results = [line["Response"] for line in lines[:-1]]
    assert lines[-1]["Response"]["response"] == {"Embedding": "Done"}
    by_id = {r["response"]["Embedding"]["Embedding"]["source_document_id"]: r for r in results}
    assert sorted(by_id) == [d["id"] for d in documents]
    assert {r["generated_by"] for r in results} == {"a1", "a2"}  # both agents took a part
    assert by_id["d2"]["response"]["Embedding"]["Embedding"]["embedding"][0] == 3.0
