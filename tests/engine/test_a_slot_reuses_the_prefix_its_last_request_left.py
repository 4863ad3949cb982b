"""Prefix reuse: a slot keeps the KV cells of its last request, and a request that
starts the same way prefills only what differs (``cached_prompt_tokens`` says how
much it reused) and gives exactly the tokens it gives on a fresh engine."""

from __future__ import annotations

from typing import Any

from conftest import RecordingSink, run, state_for

from paddler.agent.llama.slot import shared_prefix
from paddler.agent.llama_engine import LlamaEngine
from paddler.protocol.prefixes import held_fingerprints, request_fingerprints
from paddler.protocol.requests import validate_request

SYSTEM = "You are a careful assistant who answers in long sentences about the sea. " * 3


def _chat(*turns: str, replies: tuple[str, ...] = ()) -> dict[str, Any]:
    history = [{"role": "system", "content": SYSTEM}]
    for index, turn in enumerate(turns):
        history.append({"role": "user", "content": turn})
        if index < len(replies):
            history.append({"role": "assistant", "content": replies[index]})
    return {"conversation_history": history, "max_tokens": 20}


def _one(engine: LlamaEngine, request: dict[str, Any]) -> tuple[str, dict[str, int]]:
    sink = run(engine, {1: request})
    kind, usage = sink.ends()[1]
    assert kind == "done", usage
    return sink.text().get(1, ""), {"cached_prompt_tokens": 0, **usage}


def test_shared_prefix_counts_the_tokens_two_lists_share_from_the_start() -> None:
    assert shared_prefix([], [1]) == 0
    assert shared_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert shared_prefix([1, 2, 3], [1, 2]) == 2
    assert shared_prefix([1, 2, 3, 4, 5], [1, 2, 9, 4, 5]) == 2
    assert shared_prefix([7], [8]) == 0
    for cut in range(0, 50):
        a = list(range(50))
        b = [*a[:cut], -1, *a[cut + 1 :]]
        assert shared_prefix(a, b) == cut


def test_a_second_turn_prefills_only_what_the_first_did_not(make_engine) -> None:
    engine, fresh = make_engine(slots=1), make_engine(slots=1)
    first, usage = _one(engine, _chat("Tell me about waves"))
    assert usage["cached_prompt_tokens"] == 0
    second = _chat("Tell me about waves", "And tides?", replies=(first,))
    text, usage = _one(engine, second)
    assert usage["cached_prompt_tokens"] > 0.5 * usage["prompt_tokens"]
    fresh_text, fresh_usage = _one(fresh, second)
    assert (text, usage["prompt_tokens"]) == (fresh_text, fresh_usage["prompt_tokens"])
    assert fresh_usage["cached_prompt_tokens"] == 0


def test_the_same_prompt_again_reuses_all_but_its_last_token(make_engine) -> None:
    engine = make_engine(slots=1)
    request = {"raw_prompt": "Once upon a time there was a lighthouse", "max_tokens": 30}
    text, usage = _one(engine, request)
    again, usage_again = _one(engine, request)
    assert again == text
    assert usage_again["cached_prompt_tokens"] == usage["prompt_tokens"] - 1


def test_a_divergent_prompt_trims_the_kept_tail(make_engine) -> None:
    engine, fresh = make_engine(slots=1), make_engine(slots=1)
    _one(engine, {"raw_prompt": "The harbour at dawn was quiet and grey " * 4, "max_tokens": 40})
    shorter = {"raw_prompt": "The harbour at dawn was loud", "max_tokens": 25}
    longer = {"raw_prompt": "The harbour at dawn was quiet and grey " * 6, "max_tokens": 25}
    for request in (shorter, longer, shorter):
        text, usage = _one(engine, request)
        assert 0 < usage["cached_prompt_tokens"] < usage["prompt_tokens"]
        assert text == _one(fresh, request)[0]


def test_each_returning_prompt_finds_the_slot_that_holds_it(make_engine) -> None:
    engine = make_engine(slots=2)
    a = {"raw_prompt": "Alpha " * 30, "max_tokens": 5}
    b = {"raw_prompt": "Bravo " * 30, "max_tokens": 5}
    sink = run(engine, {1: a, 2: b})
    assert all("cached_prompt_tokens" not in end[1] for end in sink.ends().values())
    for _ in range(2):
        sink = run(engine, {3: b, 4: a})
        cached = {rid: end[1].get("cached_prompt_tokens", 0) for rid, end in sink.ends().items()}
        assert min(cached.values()) > 25, cached


def test_a_cancelled_requests_cells_are_reused_correctly(make_engine) -> None:
    engine, fresh = make_engine(slots=1), make_engine(slots=1)
    long = {"raw_prompt": "A story about a ship " * 10, "max_tokens": 200}
    sink = RecordingSink(engine)
    engine.admit(1, validate_request(long))
    for _ in range(6):
        engine.step(sink)
    engine.cancel(1)
    while engine.active_count():
        engine.step(sink)
    assert sink.ends()[1][1][1] == "Cancelled"
    text, usage = _one(engine, long)
    assert usage["cached_prompt_tokens"] > 0
    assert text == _one(fresh, long)[0]


def test_a_new_model_drops_what_the_slots_kept(make_engine, other_tiny_model) -> None:
    engine = make_engine(slots=1)
    request = {"raw_prompt": "Once upon a time there was a lighthouse", "max_tokens": 10}
    _one(engine, request)
    engine.apply_state(state_for(other_tiny_model))
    assert engine.status().ready
    _, usage = _one(engine, request)
    assert usage["cached_prompt_tokens"] == 0


def test_a_request_that_filled_its_slot_leaves_reusable_cells(make_engine) -> None:
    engine, fresh = make_engine(slots=1), make_engine(slots=1)
    full = {"raw_prompt": "Sea " * 10, "max_tokens": 5000}
    sink = run(engine, {1: full})
    assert sink.ends()[1][0] == "done"  # ended by the full context, not an error
    request = {"raw_prompt": "Sea " * 10 + "and sky", "max_tokens": 10}
    text, usage = _one(engine, request)
    assert usage["cached_prompt_tokens"] > 0
    assert text == _one(fresh, request)[0]


def test_the_engine_reports_what_each_slot_holds(make_engine, other_tiny_model) -> None:
    engine = make_engine(slots=2)
    engine.take_held()  # loading the model said every slot holds nothing
    request = _chat("Tell me about waves")
    text, _ = _one(engine, request)
    held = engine.take_held()
    (chain,) = held.values()
    assert chain == held_fingerprints(validate_request(request), text)
    assert engine.take_held() == {}
    # the broker's chain of the next turn starts with it
    following = validate_request(_chat("Tell me about waves", "And tides?", replies=(text,)))
    assert request_fingerprints(following)[: len(chain)] == chain
    engine.apply_state(state_for(other_tiny_model))
    assert engine.take_held() == {0: [], 1: []}
