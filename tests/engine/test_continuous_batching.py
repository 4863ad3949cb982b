"""The llama.cpp engine, driven directly, on a tiny random-weight model."""

from __future__ import annotations

from typing import Any

from paddler.protocol.requests import validate_request
from tests.engine.conftest import RecordingSink, run


def test_concurrent_requests_on_as_many_slots_progress_together(make_engine) -> None:
    engine = make_engine(slots=4)
    sink = run(engine, {i: {"raw_prompt": f"the cat {i}", "max_tokens": 12} for i in range(4)})
    steps_of: dict[int, list[int]] = {}
    for step, kind, request_id, _ in sink.events:
        if kind == "tokens":
            steps_of.setdefault(request_id, []).append(step)
    # every request got one token per decode step, in the same steps as the others
    assert len(steps_of) == 4
    first = steps_of[0]
    assert first == list(range(first[0], first[0] + len(first)))
    for request_id in range(4):
        assert steps_of[request_id] == first
    # one decode step served all four: 1 prefill + 11 token decodes, not 4x that
    assert engine.decode_steps == 12


def test_max_tokens_ends_a_request_exactly(make_engine) -> None:
    engine = make_engine()
    sink = run(
        engine,
        {
            1: {"raw_prompt": "hello", "max_tokens": 7},
            2: {"raw_prompt": "hello world", "max_tokens": 1},
        },
    )
    ends = sink.ends()
    assert ends[1][0] == "done" and ends[1][1]["content_tokens"] == 7
    assert ends[2][0] == "done" and ends[2][1]["content_tokens"] == 1
    assert ends[1][1]["prompt_tokens"] == 2  # <s> ▁hello
    tokens_of_1 = [e for e in sink.events if e[1] == "tokens" and e[2] == 1]
    assert len(tokens_of_1) == 7  # one frame per step, never more


def test_a_stop_string_ends_the_request_before_it(make_engine) -> None:
    engine = make_engine()
    free = run(engine, {1: {"raw_prompt": "the quick brown fox", "max_tokens": 40}}).text()[1]
    stop = free[10:16]  # usually spans a token boundary
    cut = free.index(stop)
    stopped = run(
        engine,
        {2: {"raw_prompt": "the quick brown fox", "max_tokens": 40, "stop": ["@@@", stop]}},
    )
    assert stopped.text()[2] == free[:cut]
    assert stopped.ends()[2][0] == "done"
    assert stop not in stopped.text()[2]
    assert stopped.stops == {2: stop}  # which stop string ended it
    assert run(engine, {3: {"raw_prompt": "the quick", "max_tokens": 5}}).stops == {}


def _others(count: int, **options: Any) -> dict[int, dict[str, Any]]:
    return {
        100 + i: {
            "raw_prompt": f"another prompt number {i} with words",
            "max_tokens": 30,
            **options,
        }
        for i in range(count)
    }


def test_a_greedy_request_gives_the_same_tokens_alone_and_beside_seven_others(make_engine) -> None:
    engine = make_engine(slots=8)
    request = {"raw_prompt": "the quick brown fox", "max_tokens": 24, "temperature": 0.0}
    alone = run(engine, {1: request}).text()[1]
    crowded = run(engine, {1: request, **_others(7)}).text()[1]
    assert alone and alone == crowded


def test_a_seed_reproduces_its_tokens_however_many_requests_run_beside_it(make_engine) -> None:
    engine = make_engine(slots=8, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    request = {"raw_prompt": "hello world", "max_tokens": 24, "seed": 1234}
    alone = run(engine, {1: request}).text()[1]
    crowded = run(engine, {1: request, **_others(7, temperature=1.0)}).text()[1]
    other_seed = run(engine, {1: {**request, "seed": 99}}).text()[1]
    assert alone == crowded
    assert alone != other_seed


def test_a_cancelled_request_gets_no_further_decode_step_and_frees_its_slot(make_engine) -> None:
    engine = make_engine(slots=1)
    sink = RecordingSink(engine)
    engine.admit(1, validate_request({"raw_prompt": "long", "max_tokens": 10_000}))
    for _ in range(5):
        engine.step(sink)
    steps_before = engine.decode_steps
    engine.cancel(1)
    engine.step(sink)
    assert engine.decode_steps == steps_before  # nothing decoded for it after the cancel
    assert sink.events[-1][1:3] == ("error", 1)
    assert sink.events[-1][3][1] == "Cancelled"
    assert engine.active_count() == 0
    # the slot and its KV cells are free: a new request runs from position 0
    after = run(engine, {2: {"raw_prompt": "long", "max_tokens": 4}})
    assert after.ends()[2][0] == "done"


def test_a_prompt_longer_than_the_slot_context_ends_with_a_clear_error(make_engine) -> None:
    engine = make_engine(slots=2, context_size=64)
    sink = run(
        engine,
        {
            1: {"raw_prompt": "word " * 600, "max_tokens": 4},
            2: {"raw_prompt": "fine", "max_tokens": 4},
        },
    )
    kind, value = sink.ends()[1]
    assert kind == "error" and value[1] == "PromptTooLong"
    assert "context_size" in value[2]
    assert sink.ends()[2][0] == "done"


def test_generation_stops_at_the_end_of_the_slot_context(make_engine) -> None:
    engine = make_engine(slots=1, context_size=256)  # llama.cpp's smallest per sequence
    sink = run(engine, {1: {"raw_prompt": "hello", "max_tokens": 1000}})
    kind, usage = sink.ends()[1]
    assert kind == "done"
    assert usage["prompt_tokens"] + usage["content_tokens"] == engine.n_ctx_seq == 256


def test_a_full_kv_cache_ends_only_the_request_holding_the_most_cells(
    make_engine, monkeypatch
) -> None:
    import paddler.agent.llama_engine as module

    engine = make_engine(slots=2)
    sink = RecordingSink(engine)
    engine.admit(1, validate_request({"raw_prompt": "a much longer prompt " * 8, "max_tokens": 20}))
    engine.admit(2, validate_request({"raw_prompt": "short", "max_tokens": 20}))
    for _ in range(3):
        engine.step(sink)
    real_decode = module.lc.llama_decode
    calls = {"n": 0}

    def full_once(context, batch):  # llama.cpp's "no KV slot" answer, once
        calls["n"] += 1
        return 1 if calls["n"] == 1 else real_decode(context, batch)

    monkeypatch.setattr(module.lc, "llama_decode", full_once)
    while engine.active_count():
        engine.step(sink)
    ends = sink.ends()
    assert ends[1][0] == "error" and ends[1][1][1] == "KvCacheExhausted"
    assert ends[2][0] == "done" and ends[2][1]["content_tokens"] == 20
    # the survivor's text is whole: the failed step was taken again, not skipped
    assert len([e for e in sink.events if e[1] == "tokens" and e[2] == 2]) == 20
