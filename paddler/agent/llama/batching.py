"""A step's batch: assembled in slot order from the busy slots (each generating
slot's token, prompt chunks in the room left), and undone for the slots whose part
llama.cpp did not keep."""

from __future__ import annotations

import operator

from paddler.agent.llama.loading import LoadedModel
from paddler.agent.llama.slot import Slot

_seq_id = operator.attrgetter("seq_id")


def assemble(loaded: LoadedModel, busy: list[Slot], prefill_limit: int) -> int:
    """Fill the batch in slot order (see ``admission.SPLIT_COST_TOKENS``): each
    generating slot's token, and prompt chunks of at most ``prefill_limit`` tokens
    in all in the room the generating slots leave. Returns the prompt tokens added."""
    builder = loaded.builder
    builder.clear()
    slots = sorted(busy, key=_seq_id)
    generating = sum(1 for slot in slots if slot.next_token >= 0)
    room = min(loaded.n_batch - generating, prefill_limit)
    prefilled = 0
    for slot in slots:
        slot.step_prefill = 0
        slot.step_token = slot.next_token
        if slot.next_token >= 0:
            slot.logits_index = builder.add(slot.next_token, slot.n_past, slot.seq_id, True)
            slot.kv.append(slot.next_token)
            slot.n_past += 1
            slot.next_token = -1
        remaining = len(slot.prompt) - slot.prefilled
        if remaining <= 0 or room <= 0:
            continue
        count = min(remaining, room)
        last = builder.add_span(
            slot.prompt,
            slot.prefilled,
            count,
            slot.n_past,
            slot.seq_id,
            count == remaining,
        )
        if count == remaining:
            slot.logits_index = last
        slot.kv += slot.prompt[slot.prefilled : slot.prefilled + count]
        slot.prefilled += count
        slot.n_past += count
        slot.step_prefill = count
        room -= count
        prefilled += count
    return prefilled


def in_batch(busy: list[Slot]) -> list[Slot]:
    """The busy slots with a token or a prompt chunk in the current batch."""
    return [s for s in busy if s.step_token >= 0 or s.step_prefill]


def roll_back(slots: list[Slot]) -> None:
    """Undo the current batch's progress of ``slots`` (llama.cpp kept none of it)."""
    for slot in slots:
        slot.logits_index = -1
        if slot.step_token >= 0:
            slot.n_past -= 1
            slot.next_token = slot.step_token
        slot.prefilled -= slot.step_prefill
        slot.n_past -= slot.step_prefill
        del slot.kv[slot.n_past :]
        slot.step_token = -1
        slot.step_prefill = 0
