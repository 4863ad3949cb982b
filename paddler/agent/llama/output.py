"""A slot's text on its way out: split into answer, reasoning and tool-call text,
paced by the request's ``text_interval_ms``, counted by kind, sent with the ids of
its tokens, and a finished tool-call block parsed and its outcome sent after it."""

from __future__ import annotations

import logging

from paddler.agent.engine import EventSink
from paddler.agent.llama.loading import LoadedModel
from paddler.agent.llama.slot import Slot
from paddler.agent.tool_calls import CONTENT, REASONING, TOOL_CALL, parse_block

log = logging.getLogger("paddler.agent")


def split(slot: Slot, text: str, last: bool = False) -> list[tuple[int, str]]:
    """``text`` as segments ``(kind, text)`` ready to send: ``CONTENT``,
    ``REASONING`` (a thinking request's reasoning) or ``TOOL_CALL`` (a request
    with tools: the text of its calls); ``last``: the end, nothing held."""
    splitter = slot.splitter
    if splitter is None:
        segments: list[tuple[int, str]] = [(CONTENT, text)] if text else []
    else:
        parts = splitter.push(text) if text else []
        if last:
            parts += splitter.finish()
        segments = [(REASONING if reasoning else CONTENT, part) for reasoning, part in parts]
    tools = slot.tools
    if tools is not None:
        separated: list[tuple[int, str]] = []
        for kind, part in segments:
            if kind == CONTENT:
                separated += tools.push(part)
            else:
                separated.append((kind, part))
        if last:
            separated += tools.finish()
        segments = separated
    for kind, part in segments:
        if kind != REASONING:
            slot.answer.append(part)
            if kind == CONTENT and slot.output is not None:
                slot.output.append(part)
    if slot.uncounted and (segments or last):
        count(slot, segments[-1][0] if segments else CONTENT)
    return segments


def paced(
    slot: Slot, segments: list[tuple[int, str]], last: bool, now: float
) -> list[tuple[int, str]] | None:
    """The segments to send now under the request's ``text_interval_ms`` (the held
    ones first, joined by kind), or ``None`` to hold them: the first text and the
    end go at once, the rest about once per interval.

    The flushes fall on a grid of the interval on the monotonic clock, not an
    interval after each slot's last: the paced slots with one interval flush in
    the same step, so their text costs the agent, the balancer and the HTTP
    workers one wakeup per interval, not one per step (16 slots flushing 100 ms
    apart each, out of phase, had text in nearly every step). A grid point less
    than half an interval away is skipped: frames are 0.5 to 1.5 intervals apart.
    ``now`` is the step's clock, one reading for every slot: a grid point that
    passed while the slots were sampled counts for all of them in the next step."""
    if not last:
        if not segments and not slot.held:
            return segments
        if now < slot.flush_at:
            slot.held += segments
            return None
        interval = slot.interval_s
        due = (now // interval + 1) * interval
        slot.flush_at = due if due - now >= interval / 2 else due + interval
    if not slot.held:
        return segments
    joined: list[tuple[int, str]] = []
    for kind, part in slot.held + segments:
        if joined and joined[-1][0] == kind:
            joined[-1] = (kind, joined[-1][1] + part)
        else:
            joined.append((kind, part))
    slot.held = []
    return joined


def keep_budget(loaded: LoadedModel, slot: Slot) -> None:
    """Close a reasoning block that used its request's ``reasoning_budget``: the
    next tokens are the closing marker (when the grammar, if any, allows them)."""
    request = slot.request
    budget = request.get("reasoning_budget") if request is not None else None
    if budget is None or slot.reasoning_tokens + slot.uncounted < budget:
        return
    slot.budget_spent = True
    splitter = slot.splitter
    model = loaded.model
    closing = model.tokenize(splitter.closing + "\n", add_special=False, parse_special=True)
    if closing and not model.piece(closing[0]).strip():
        del closing[0]  # a tokenizer's space before a word (SentencePiece's prefix)
    sampler = slot.sampler
    if sampler is not None and sampler.grammar is not None:
        log.info("request %d: no reasoning budget with a grammar", slot.request_id)
        return
    slot.forced = closing[::-1]
    log.debug("request %d: reasoning budget of %d tokens spent", slot.request_id, budget)


def count(slot: Slot, kind: int) -> None:
    """Count the tokens whose text just went out (held back text goes out later,
    with the text that decides what it is) as ``kind``."""
    if kind == REASONING:
        slot.reasoning_tokens += slot.uncounted
    elif kind == TOOL_CALL:
        slot.tool_call_tokens += slot.uncounted
    slot.uncounted = 0


def emit(sink: EventSink, slot: Slot, text: str, now: float, last: bool = False) -> None:
    """Send ``text`` with the ids of the tokens sampled since the last piece
    (reasoning, tool calls and answer apart); ids whose text is all held back
    wait. A tool-call block that ended is parsed and its outcome sent after it.
    ``now``: the step's clock, for paced text."""
    segments = split(slot, text, last)
    if slot.interval_s:
        ready = paced(slot, segments, last, now)
        if ready is None:
            return  # held, with the ids and log-probabilities of their tokens
        segments = ready
    if segments:
        token_ids, slot.unsent = slot.unsent, []
        if slot.unsent_logprobs:
            logprobs, slot.unsent_logprobs = slot.unsent_logprobs, []
            sink.logprobs(slot.request_id, logprobs)
        for kind, part in segments:
            if kind == CONTENT:
                sink.tokens(slot.request_id, [part], token_ids)
            elif kind == REASONING:
                sink.reasoning(slot.request_id, [part], token_ids)
            else:
                sink.tool_call(slot.request_id, [part], token_ids)
            token_ids = []
    tools = slot.tools
    if tools is not None and tools.finished:
        request = slot.request
        assert request is not None
        for block in tools.finished:
            outcome = parse_block(tools.format, block, request["tools"])
            if not outcome.parsed:
                log.info(
                    "request %d: a tool call that is %s: %s",
                    slot.request_id,
                    outcome.outcome.replace("_", " "),
                    "; ".join(outcome.errors),
                )
            if request.get("parse_tool_calls"):
                sink.tool_calls(slot.request_id, outcome.to_body())
        tools.finished.clear()
