"""Where a request starts: the free slot it takes (prefix reuse against keeping the
busy slots together), the KV cells of that slot it keeps, and what its first step
needs (the grammar that forces a tool call, the splitter of a thinking answer, a
check of the tokens a continued request brings)."""

from __future__ import annotations

from typing import Any

from paddler.agent.llama.loading import LoadedModel
from paddler.agent.llama.native import LlamaModel
from paddler.agent.llama.prompt import forces_tool_call
from paddler.agent.llama.sampling import GrammarError
from paddler.agent.llama.slot import Slot, shared_prefix
from paddler.agent.reasoning import ReasoningSplitter, thinking_markers
from paddler.agent.tool_calls import forced_grammar
from paddler.protocol.tool_calls import forced_tool

SPLIT_COST_TOKENS = 256
"""What a free slot next to the busy ones is worth, in prompt tokens prefilled again.

Each slot is a sequence of its own KV stream (``kv_unified`` off, as llama-server
runs), and llama.cpp puts the sequences of such a cache into one ubatch only while
their ids are consecutive and rising in the batch (``split_equal`` with
``sequential``): busy slots 0, 2 and 5 make every decode step three ubatches, each
a pass over all the weights, and none reuses the last step's graph. Measured here at
4 concurrent requests on 8 slots: a step of 5.3-5.6 ms split against 3.3-3.7 ms
whole. A gap costs every step of every busy slot for as long as it lasts, a shorter
prefix costs its tokens once: a slot that would open a gap must hold this many more
tokens of the prompt than one that would not (one that closes a gap counts as much
again). The batch itself is assembled in slot order (``batching.assemble``)."""


def best_slot(free: list[Slot], tokens: list[int], busy: set[int]) -> Slot:
    """The free slot whose kept tokens share the longest prefix with ``tokens``,
    less ``SPLIT_COST_TOKENS`` for each run of consecutive busy slots it would add
    (+1 alone, 0 next to a busy slot, -1 between two; ``busy``: the busy slots'
    sequence ids); among equals, the one that adds fewer runs, then the one used
    least recently."""

    def score(slot: Slot) -> tuple[int, int, int]:
        runs = 1 - ((slot.seq_id - 1) in busy) - ((slot.seq_id + 1) in busy)
        return (
            shared_prefix(slot.kv, tokens) - SPLIT_COST_TOKENS * runs,
            -runs,
            -slot.last_used,
        )

    return max(free, key=score)


def reuse(loaded: LoadedModel, slot: Slot) -> None:
    """Keep the KV cells of the slot's kept tokens that start its new prompt and
    free the rest; prefilling starts after them. The last prompt token is always
    decoded again: its logits give the first token."""
    common = min(shared_prefix(slot.kv, slot.prompt), len(slot.prompt) - 1)
    if common < len(slot.kv):
        if not loaded.context.trim(slot.seq_id, common):
            loaded.context.forget(slot.seq_id)  # a memory that cannot cut a sequence
            common = 0
        del slot.kv[common:]
    slot.prefilled = slot.n_past = slot.cached = common


def continuation_problem(model: LlamaModel, generated: list[int]) -> str | None:
    """Why ``generated`` cannot be this model's output so far, if it cannot."""
    n_vocab = model.n_vocab
    for index, token in enumerate(generated):
        if not 0 <= token < n_vocab:
            return f"continued token {index} ({token}) is not in this model's vocabulary"
        if model.is_eog(token):
            return f"continued token {index} ({token}) ends generation"
    return None


def tool_call_grammar(fmt: Any, request: dict[str, Any]) -> str | None:
    """GBNF that makes the answer a tool call, when ``tool_choice`` is required or
    names a tool (``GrammarError`` if the tools' schemas cannot become one)."""
    if fmt is None or not forces_tool_call(request):
        return None
    try:
        return forced_grammar(
            fmt,
            request["tools"],
            forced_tool(request["tool_choice"]),
            request.get("parallel_tool_calls", True),
        )
    except Exception as exc:  # the converter raises many types for bad schemas
        raise GrammarError(
            "GrammarInitializationFailed",
            f"cannot turn the tools' parameter schemas into a grammar: {exc}",
        ) from exc


def thinking_splitter(
    loaded: LoadedModel, request: dict[str, Any], prompt: list[int]
) -> ReasoningSplitter | None:
    """For a conversation with thinking on, when the template has markers: what
    tells its reasoning from its answer (inside the block already when the
    prompt opened it)."""
    if (
        not request.get("enable_thinking")
        or "conversation_history" not in request
        or forces_tool_call(request)
    ):
        return None
    markers = thinking_markers(loaded.template.source if loaded.template else None)
    if markers is None:
        return None
    model = loaded.model
    tail = b"".join(model.piece(token) for token in prompt[-8:])
    inside = tail.decode("utf-8", "replace").rstrip().endswith(markers[0])
    return ReasoningSplitter(*markers, inside=inside)
