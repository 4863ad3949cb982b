"""A request takes the free slot whose kept tokens share the longest prefix with its
prompt, weighed against keeping the busy slots side by side (``SPLIT_COST_TOKENS``);
among slots equal on both, the one used least recently."""

from __future__ import annotations

from conftest import RecordingSink

from paddler.agent.llama.admission import SPLIT_COST_TOKENS, best_slot
from paddler.agent.llama.slot import Slot
from paddler.agent.llama_engine import LlamaEngine
from paddler.protocol.requests import validate_request

PROMPT = list(range(10, 40))


def _slots(count: int) -> list[Slot]:
    return [Slot(seq_id, kv=list(PROMPT)) for seq_id in range(count)]


def test_among_equal_free_slots_best_slot_takes_the_least_recently_used() -> None:
    slots = _slots(4)  # all free, all holding the whole prompt: equal but for their use
    for order in ([3, 1, 2, 0], [0, 2, 1, 3], [1, 3, 0, 2]):
        for last_used, slot in zip(order, slots, strict=True):
            slot.last_used = 10 * last_used
        oldest = min(slots, key=lambda slot: slot.last_used)
        for free in (slots, slots[::-1]):  # whatever the order of the free list
            assert best_slot(free, [*PROMPT, 99], set()) is oldest


def test_side_by_side_comes_before_least_recently_used() -> None:
    slots = _slots(6)
    busy = {2}
    free = [slot for slot in slots if slot.seq_id not in busy]
    for slot in free:
        slot.last_used = 100 - slot.seq_id  # slot 5 was used least recently
    # slots 1 and 3 are next to the busy slot 2: of those two, the one used less recently
    assert best_slot(free, PROMPT, busy) is slots[3]
    slots[3].last_used, slots[1].last_used = slots[1].last_used, slots[3].last_used
    assert best_slot(free, PROMPT, busy) is slots[1]
    # the slot apart, used least recently, wins only with more than SPLIT_COST_TOKENS
    # more of the prompt: with exactly that many it is even, and side by side goes first
    longer = [*PROMPT, *range(1_000, 1_000 + SPLIT_COST_TOKENS + 1)]
    slots[5].kv = longer[:-1]
    assert best_slot(free, [*longer, 7], busy) is slots[1]
    slots[5].kv = list(longer)
    assert best_slot(free, [*longer, 7], busy) is slots[5]


def _run_alone(engine: LlamaEngine, request_id: int, request: dict[str, object]) -> int:
    """Serve one request alone; the slot it took (the one whose holdings changed)."""
    sink = RecordingSink(engine)
    engine.admit(request_id, validate_request(request))
    while engine.active_count():
        engine.step(sink)
    assert sink.ends()[request_id][0] == "done"
    (seq_id,) = engine.take_held()
    return seq_id


def test_the_engine_takes_turns_between_slots_holding_the_same_prompt(make_engine) -> None:
    engine = make_engine(slots=2)
    request = {"raw_prompt": "The lighthouse keeper counted the waves " * 8, "max_tokens": 5}
    sink = RecordingSink(engine)
    for request_id in (1, 2):  # at once: one in each slot, both hold the same tokens
        engine.admit(request_id, validate_request(request))
    while engine.active_count():
        engine.step(sink)
    assert sink.text()[1] == sink.text()[2]
    engine.take_held()
    first = _run_alone(engine, 3, request)
    assert [_run_alone(engine, request_id, request) for request_id in (4, 5, 6)] == [
        1 - first,
        first,
        1 - first,
    ]
