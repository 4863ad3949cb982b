"""A request that ends while its prompt is still being prefilled (cancelled, failed)
leaves KV cells holding only part of that prompt: its slot reports that it holds
nothing, so the balancer sends no later request there for a prefix it lacks. One
that ends after its prompt was prefilled reports the prompt."""

from __future__ import annotations

from typing import Any

from conftest import RecordingSink

from paddler.agent.llama_engine import LlamaEngine
from paddler.protocol.prefixes import held_fingerprints
from paddler.protocol.requests import validate_request

LONG = {"raw_prompt": "A story about a ship " * 14, "max_tokens": 50}
"""294 characters (one whole fingerprint block), 128 tokens on the tiny model:
prefilled over many steps with a small ``n_batch``."""
N_BATCH = 8


def _admit_and_step(
    engine: LlamaEngine, request: dict[str, Any], until: Any
) -> tuple[RecordingSink, Any]:
    """Admit ``request`` as request 1 and step until ``until(slot)`` holds; its slot."""
    sink = RecordingSink(engine)
    engine.admit(1, validate_request(request))
    for _ in range(1_000):
        engine.step(sink)
        slot = engine._by_request[1]
        if until(slot):
            return sink, slot
    raise AssertionError("the request never got there")


def _cancel_and_drain(engine: LlamaEngine, sink: RecordingSink) -> None:
    engine.cancel(1)
    while engine.active_count():
        engine.step(sink)
    assert sink.ends()[1][1][1] == "Cancelled"


def test_a_request_cancelled_in_its_prompt_reports_that_its_slot_holds_nothing(
    make_engine,
) -> None:
    engine = make_engine(slots=2, n_batch=N_BATCH)
    engine.take_held()  # loading the model said every slot holds nothing
    assert held_fingerprints(validate_request(LONG), None), "the prompt has a chain"
    sink, slot = _admit_and_step(engine, LONG, lambda slot: slot.prefilled >= 3 * N_BATCH)
    assert 0 < slot.prefilled < len(slot.prompt), "cancelled in the middle of its prompt"
    seq_id = slot.seq_id
    _cancel_and_drain(engine, sink)
    assert engine.take_held() == {seq_id: []}


def test_a_request_cancelled_after_its_prompt_reports_the_prompt(make_engine) -> None:
    engine = make_engine(slots=2, n_batch=N_BATCH)
    engine.take_held()
    sink, slot = _admit_and_step(engine, LONG, lambda slot: slot.generated >= 2)
    assert slot.prefilled == len(slot.prompt)
    seq_id = slot.seq_id
    _cancel_and_drain(engine, sink)
    assert engine.take_held() == {seq_id: held_fingerprints(validate_request(LONG), None)}


def test_a_request_cut_short_in_its_prompt_leaves_cells_its_agent_still_reuses(
    make_engine,
) -> None:
    """What the slot reports is not what it keeps: the same prompt again on this
    agent still reuses the cells the cancelled request prefilled."""
    engine = make_engine(slots=1, n_batch=N_BATCH)
    sink, _ = _admit_and_step(engine, LONG, lambda slot: slot.prefilled >= 3 * N_BATCH)
    _cancel_and_drain(engine, sink)
    assert engine.take_held() == {0: []}
    sink = RecordingSink(engine)
    engine.admit(2, validate_request(LONG))
    while engine.active_count():
        engine.step(sink)
    kind, usage = sink.ends()[2]
    assert kind == "done", usage
    assert usage["cached_prompt_tokens"] >= 3 * N_BATCH
    assert engine.take_held() == {0: held_fingerprints(validate_request(LONG), sink.text()[2])}
