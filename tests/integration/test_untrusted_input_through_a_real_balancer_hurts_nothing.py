"""Untrusted input against a real balancer (gunicorn workers, the broker) and a real
llama.cpp agent on the tiny model: the grammar that crashed llama.cpp's parser and a
JSON body nested 100,000 deep are answered 400 naming the field; a JSON schema with
an evil regex (``^(a+)+$``, exponential for a backtracking engine) is served while a
concurrent stream on the same agent keeps flowing, and the agent stays registered."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from paddler.testing.cluster import wait_until
from paddler.testing.tiny_model import write_tiny_llama

DEEP = 60_000
DEEP_GRAMMAR = "root ::= " + "(" * DEEP + '"a"' + ")" * DEEP
MAX_GAP_S = 2.0
"""The longest pause a concurrent stream may see (steps take milliseconds here)."""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture
def cluster(make_cluster, model) -> Any:
    cluster = make_cluster()
    cluster.start_balancer()
    cluster.wait_for_http()
    cluster.start_real_agent("llama", slots=2)
    state = {
        "model": {"LocalToAgent": str(model)},
        "inference_parameters": {"context_size": 1024, "temperature": 0.0},
    }
    put = httpx.put(f"{cluster.management_url}/api/v1/balancer_desired_state", json=state)
    assert put.status_code in (200, 204), put.text
    wait_until(lambda: _ready(cluster), timeout_s=30, what="the agent loads the model")
    return cluster


def _agents(cluster: Any) -> list[dict[str, Any]]:
    return list(httpx.get(f"{cluster.management_url}/api/v1/agents").json()["agents"])


def _ready(cluster: Any) -> bool:
    agents = _agents(cluster)
    return len(agents) == 1 and agents[0]["state_application_status"] == "Applied"


def test_a_60000_deep_grammar_and_a_deep_json_body_get_400(cluster) -> None:
    url = f"{cluster.inference_url}/api/v1/continue_from_raw_prompt"
    body = {
        "raw_prompt": "x",
        "max_tokens": 4,
        "grammar": {"type": "gbnf", "grammar": DEEP_GRAMMAR, "root": "root"},
    }
    answer = httpx.post(url, json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == "grammar.grammar"

    deep = "[" * 100_000 + "]" * 100_000
    answer = httpx.post(url, content=deep, headers={"Content-Type": "application/json"}, timeout=30)
    assert answer.status_code == 400, answer.text
    assert "nested deeper than" in answer.json()["error"]

    # nothing was hurt: the same agent serves the next request
    ok = httpx.post(url, json={"raw_prompt": "Once upon", "max_tokens": 8}, timeout=30)
    assert ok.status_code == 200
    assert '"Done"' in ok.text
    assert [agent["name"] for agent in _agents(cluster)] == ["llama"]


def test_an_evil_regex_schema_does_not_stall_a_concurrent_stream(cluster) -> None:
    url = f"{cluster.inference_url}/api/v1/continue_from_raw_prompt"
    gaps: list[float] = []
    ends: list[str] = []

    def stream() -> None:
        body = {"raw_prompt": "Once upon a time", "max_tokens": 300}
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            last = time.monotonic()
            for line in response.iter_lines():
                if not line:
                    continue
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                token = json.loads(line).get("Response", {}).get("response", {})
                if "Done" in token.get("GeneratedToken", {}):
                    ends.append("done")

    streaming = threading.Thread(target=stream)
    streaming.start()
    try:
        wait_until(lambda: len(gaps) >= 3, timeout_s=30, what="the stream begins")
        evil = {
            "raw_prompt": "aaaa",
            "max_tokens": 40,
            "grammar": {
                "type": "json_schema",
                "schema": json.dumps({"type": "string", "pattern": "^(a+)+$"}),
            },
        }
        answer = httpx.post(url, json=evil, timeout=60)
        # a pattern RE2 runs in linear time: served (or its output refused), never a stall
        assert answer.status_code in (200, 400), answer.text
    finally:
        streaming.join(timeout=60)
    assert ends == ["done"], gaps[-5:]
    assert max(gaps[1:]) < MAX_GAP_S, sorted(gaps)[-5:]
    assert [agent["name"] for agent in _agents(cluster)] == ["llama"]
