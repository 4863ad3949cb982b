"""A JSON-schema ``pattern`` is checked against the finished output on the engine
thread. With Python's backtracking ``re``, ``^(a+)+$`` against 40 ``a`` and a ``b``
takes about 2^40 steps, holding the GIL: every other stream on the agent, and its
heartbeats, would stop. The check runs on RE2 (linear time) instead."""

from __future__ import annotations

import json
import time

import pytest

import paddler.agent.llama.sampling as sampling
from paddler.protocol.requests import validate_request
from tests.engine.conftest import RecordingSink

EVIL = {"type": "string", "pattern": "^(a+)+$"}
A_COUNT = 40


@pytest.fixture
def loose_converter(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama-cpp-python's converter turns a pattern into grammar rules, so its output
    would match. The output check exists for constraints a converter misses: stand in
    for such a converter, whose grammar lets through many ``a`` then a ``b``."""

    def convert(schema: str) -> str:
        return f'root ::= "\\"" "a"{{{A_COUNT}}} "b\\""'

    monkeypatch.setattr(sampling, "json_schema_to_gbnf", convert)


def test_an_evil_pattern_check_does_not_stall_the_stream_beside_it(
    make_engine, loose_converter
) -> None:
    engine = make_engine(slots=2)
    sink = RecordingSink(engine)
    evil = {
        "raw_prompt": "x",
        "max_tokens": A_COUNT + 8,
        "grammar": {"type": "json_schema", "schema": json.dumps(EVIL)},
    }
    plain = {"raw_prompt": "story", "max_tokens": 2 * A_COUNT}
    engine.admit(1, validate_request(evil))
    engine.admit(2, validate_request(plain))
    slowest_step_s = 0.0
    for _ in range(10_000):
        if not engine.active_count():
            break
        started = time.perf_counter()
        engine.step(sink)
        slowest_step_s = max(slowest_step_s, time.perf_counter() - started)
    assert not engine.active_count(), "requests did not finish"

    ends = sink.ends()
    assert sink.text()[1] == '"' + "a" * A_COUNT + 'b"'
    code, kind, description = ends[1][1]
    assert (ends[1][0], code, kind) == ("error", 422, "GrammarRejectedModelOutput")
    assert "does not match '^(a+)+$'" in description
    assert ends[2] == ("done", {"prompt_tokens": ends[2][1]["prompt_tokens"], "content_tokens": 80})
    # the step that checked the output took as long as any other
    assert slowest_step_s < 0.5, slowest_step_s


def test_a_pattern_re2_cannot_run_is_refused_before_generation(make_engine) -> None:
    engine = make_engine()
    sink = RecordingSink(engine)
    schema = {"type": "string", "pattern": "^(a)\\1$"}  # a backreference
    request = {"raw_prompt": "x", "max_tokens": 4}
    engine.admit(
        1,
        {
            **validate_request(request),
            "grammar": {"type": "json_schema", "schema": json.dumps(schema)},
        },
    )
    engine.admit(2, validate_request(request))
    for _ in range(1_000):
        if not engine.active_count():
            break
        engine.step(sink)
    ends = sink.ends()
    assert ends[1][0] == "error" and ends[1][1][1] == "GrammarInitializationFailed", ends[1]
    assert "linear-time" in ends[1][1][2]
    assert ends[2][0] == "done"
