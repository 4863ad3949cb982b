"""llama.cpp decodes the sequences of a multi-stream KV cache (one stream per slot) in
one ubatch only while their ids are consecutive and rising in the batch; otherwise a
step is several ubatches, each a pass over all the weights. So the engine assembles
each batch in slot order, and a request takes a free slot next to the busy ones
unless another free slot holds a much longer prefix of its prompt
(``SPLIT_COST_TOKENS``)."""

from __future__ import annotations

from typing import Any

import pytest

import paddler.agent.llama_engine as module
from paddler.agent.llama.scheduler import SPLIT_COST_TOKENS
from paddler.protocol.requests import validate_request
from tests.engine.conftest import RecordingSink


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The sequence id of every token of every batch decoded, in batch order."""
    real_decode = module.lc.llama_decode
    seen: list[list[int]] = []

    def record(context: Any, batch: Any) -> int:
        seen.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return int(real_decode(context, batch))

    monkeypatch.setattr(module.lc, "llama_decode", record)
    return seen


def _prompt(word: str, count: int = 12) -> str:
    return f"{word} " * count


def _step_until(engine: Any, sink: RecordingSink, done: set[int]) -> None:
    for _ in range(500):
        if done <= set(sink.ends()):
            return
        engine.step(sink)
    raise AssertionError(f"requests {done - set(sink.ends())} did not end")


def _admit(engine: Any, request_id: int, prompt: str, max_tokens: int) -> None:
    engine.admit(request_id, validate_request({"raw_prompt": prompt, "max_tokens": max_tokens}))


def test_a_batch_is_in_slot_order_whatever_order_its_requests_came_in(
    make_engine, batches: list[list[int]]
) -> None:
    engine = make_engine(slots=4)
    sink = RecordingSink(engine)
    _admit(engine, 1, _prompt("Alpha"), 2)  # slot 0
    _admit(engine, 2, _prompt("Bravo"), 30)  # slot 1
    engine.step(sink)
    _step_until(engine, sink, {1})
    _admit(engine, 3, _prompt("Alpha"), 10)  # after request 2: back to slot 0, its prefix
    _step_until(engine, sink, {2, 3})
    assert sink.ends()[3][1]["cached_prompt_tokens"] > 0  # it did take slot 0
    mixed = [seqs for seqs in batches if len(set(seqs)) > 1]
    assert mixed and all(seqs == sorted(seqs) for seqs in batches), batches


def test_a_request_takes_the_free_slot_next_to_the_busy_ones_over_a_short_prefix(
    make_engine, batches: list[list[int]]
) -> None:
    engine = make_engine(slots=6)
    sink = RecordingSink(engine)
    words = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot"]
    for index, word in enumerate(words):  # slots 0..5 in turn
        _admit(engine, index + 1, _prompt(word), 40 if index < 3 else 2)
    _step_until(engine, sink, {4, 5, 6})  # slots 3, 4, 5 free; 5 holds Foxtrot's cells
    batches.clear()
    _admit(engine, 7, _prompt("Foxtrot"), 3)
    engine.step(sink)
    assert sorted(set(batches[0])) == [0, 1, 2, 3], batches[0]  # slot 3, not slot 5
    _step_until(engine, sink, {1, 2, 3, 7})
    assert sink.ends()[7][1].get("cached_prompt_tokens", 0) < SPLIT_COST_TOKENS


def test_a_much_longer_prefix_is_worth_a_slot_apart(make_engine, batches: list[list[int]]) -> None:
    engine = make_engine(slots=6, context_size=1024)
    sink = RecordingSink(engine)
    long_prompt = _prompt("F", SPLIT_COST_TOKENS)  # two tokens a word on the tiny model
    prompts = [_prompt(w) for w in ("Alpha", "Bravo", "Charlie", "Delta", "Echo")]
    for index, prompt in enumerate([*prompts, long_prompt]):
        _admit(engine, index + 1, prompt, 40 if index < 3 else 2)
    _step_until(engine, sink, {4, 5, 6})
    batches.clear()
    _admit(engine, 7, long_prompt, 3)
    engine.step(sink)
    assert 5 in batches[0] and 3 not in batches[0], (batches[0], sink.ends())
    assert batches[0] == sorted(batches[0])
    _step_until(engine, sink, {1, 2, 3, 7})
    assert sink.ends()[7][1]["cached_prompt_tokens"] > SPLIT_COST_TOKENS
