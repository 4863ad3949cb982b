"""Per-request sampling options the OpenAI API has, honoured by the engine:
log-probabilities (only for requests that ask), frequency and presence penalties,
and logit biases (-100 bans a token, +100 all but forces it)."""

from __future__ import annotations

import math
from typing import Any

from conftest import run

from paddler.agent.llama_engine import LlamaEngine

PROMPT = {"raw_prompt": "Once upon a time", "max_tokens": 30}


def _entries(sink: Any, request_id: int) -> list[dict[str, Any]]:
    return [
        e for _, kind, rid, v in sink.events if kind == "logprobs" and rid == request_id for e in v
    ]


def _ids(sink: Any, request_id: int) -> list[int]:
    return [token for _, ids in sink.frames[request_id] for token in ids]


def test_logprobs_come_only_for_the_request_that_asks(make_engine) -> None:
    engine = make_engine(slots=2)
    sink = run(engine, {1: {**PROMPT, "logprobs": True, "top_logprobs": 5}, 2: PROMPT})
    assert sink.text()[1] == sink.text()[2]  # asking changes nothing else
    assert _entries(sink, 2) == []
    entries = _entries(sink, 1)
    assert len(entries) == 30 == sink.ends()[1][1]["content_tokens"]
    assert "".join(e["token"] for e in entries) == sink.text()[1]
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 5
        logprobs = [t["logprob"] for t in top]
        assert logprobs == sorted(logprobs, reverse=True) and all(lp <= 0 for lp in logprobs)
        assert sum(math.exp(lp) for lp in logprobs) <= 1.0 + 1e-4
        # greedy: the sampled token is the most likely one
        assert (entry["token"], entry["logprob"]) == (top[0]["token"], top[0]["logprob"])
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]


def test_logprobs_without_alternatives(make_engine) -> None:
    engine = make_engine(slots=1)
    sink = run(engine, {1: {**PROMPT, "logprobs": True}})
    entries = _entries(sink, 1)
    assert entries and all(e["top_logprobs"] == [] and e["logprob"] <= 0 for e in entries)


def test_a_banned_token_never_comes_and_a_forced_one_always_does(make_engine) -> None:
    engine: LlamaEngine = make_engine(slots=1)
    plain = run(engine, {1: PROMPT})
    first = _ids(plain, 1)[0]
    banned = run(engine, {1: {**PROMPT, "logit_bias": {str(first): -100}}})
    assert first not in _ids(banned, 1)
    forced_token = _ids(plain, 1)[3]
    forced = run(engine, {1: {**PROMPT, "max_tokens": 5, "logit_bias": {str(forced_token): 100}}})
    assert set(_ids(forced, 1)) == {forced_token}


def test_a_logit_bias_for_a_token_the_model_lacks_is_refused(make_engine) -> None:
    engine = make_engine(slots=1)
    sink = run(engine, {1: {**PROMPT, "logit_bias": {"999999": 5}}})
    kind, (code, error, description) = sink.ends()[1]
    assert (kind, code, error) == ("error", 400, "InvalidRequest")
    assert description.startswith("logit_bias: token 999999 is not in this model's vocabulary")


def test_penalties_change_a_repetitive_answer(make_engine) -> None:
    engine = make_engine(slots=1)
    long = {**PROMPT, "max_tokens": 120}
    plain = _ids(run(engine, {1: long}), 1)
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = _ids(run(engine, {1: {**long, **penalty}}), 1)
        assert penalised != plain
        # repeats get rarer: fewer tokens that came before
        assert len(penalised) - len(set(penalised)) < len(plain) - len(set(plain)), penalty
