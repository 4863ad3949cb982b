"""A thinking-style chat template on the tiny model: with ``enable_thinking`` the
reasoning between the markers streams apart from the answer, and the usage counts
the two apart; off, everything is answer. A grammar makes the random model write a
reasoning block, as a thinking model would."""

from __future__ import annotations

from typing import Any

from conftest import RecordingSink, run, state_for

from paddler.protocol.codec import pack_token_ids
from paddler.protocol.requests import CONTINUATION, validate_request

TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: "
    "{% if '</think>' in m.content %}{{ m.content.split('</think>')[-1] }}"
    "{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% if enable_thinking %}<think>\n{% endif %}"
    "{% endif %}"
)
GRAMMAR = {"type": "gbnf", "grammar": 'root ::= "I think a lot." "</think>" " The answer."'}


def _request(thinking: bool) -> dict[str, Any]:
    return {
        "conversation_history": [{"role": "user", "content": "Why?"}],
        "enable_thinking": thinking,
        "grammar": GRAMMAR,
        "max_tokens": 60,
    }


def _texts(sink: RecordingSink, request_id: int) -> tuple[str, str]:
    reasoning = "".join(
        "".join(v) for _, kind, rid, v in sink.events if kind == "reasoning" and rid == request_id
    )
    return reasoning, sink.text().get(request_id, "")


def _engine(make_engine: Any, tiny_model: Any) -> Any:
    engine = make_engine(slots=2)
    engine.apply_state(
        {
            **state_for(tiny_model),
            "use_chat_template_override": True,
            "chat_template_override": {"content": TEMPLATE},
        }
    )
    assert engine.status().ready
    return engine


def test_reasoning_streams_apart_and_counts_apart(make_engine, tiny_model) -> None:
    engine = _engine(make_engine, tiny_model)
    sink = run(engine, {1: _request(True), 2: _request(False)})
    assert _texts(sink, 1) == ("I think a lot.", "The answer.")
    kind, usage = sink.ends()[1]
    assert kind == "done" and usage["reasoning_tokens"] > 0 and usage["content_tokens"] > 0
    # thinking off: no split, the model's text is all answer
    assert _texts(sink, 2) == ("", "I think a lot.</think> The answer.")
    assert "reasoning_tokens" not in sink.ends()[2][1]


def test_a_reasoning_stream_continued_elsewhere_splits_the_same(make_engine, tiny_model) -> None:
    engine, other = _engine(make_engine, tiny_model), _engine(make_engine, tiny_model)
    reference = run(engine, {1: _request(True)})
    frames = reference.frames[1]
    kinds = [k for _, k, rid, _ in reference.events if rid == 1 and k in ("tokens", "reasoning")]
    assert len(kinds) == len(frames) and "reasoning" in kinds and "tokens" in kinds
    whole = _texts(reference, 1)
    usage = dict(reference.ends()[1][1])
    usage.pop("cached_prompt_tokens", None)
    for cut in range(1, len(frames)):
        token_ids = [token for _, ids in frames[:cut] for token in ids]
        request = validate_request(_request(True))
        request[CONTINUATION] = {"token_ids": pack_token_ids(token_ids)}
        sink = RecordingSink(other)
        other.admit(5, request)
        while other.active_count():
            other.step(sink)
        sent_reasoning = "".join(
            text
            for (text, _), kind in zip(frames[:cut], kinds, strict=False)
            if kind == "reasoning"
        )
        sent_answer = "".join(
            text for (text, _), kind in zip(frames[:cut], kinds, strict=False) if kind == "tokens"
        )
        reasoning, answer = _texts(sink, 5)
        assert (sent_reasoning + reasoning, sent_answer + answer) == whole, f"cut {cut}"
        continued = dict(sink.ends()[5][1])
        continued.pop("cached_prompt_tokens", None)
        assert continued == usage, f"cut {cut}"


def test_a_reasoning_budget_closes_the_block_and_the_model_answers(make_engine, tiny_model) -> None:
    engine = _engine(make_engine, tiny_model)
    plain = {"conversation_history": [{"role": "user", "content": "Why?"}], "max_tokens": 40}
    sink = run(
        engine,
        {
            1: {**plain, "enable_thinking": True, "reasoning_budget": 5},
            2: {**plain, "enable_thinking": True, "reasoning_budget": 0},
            3: {**plain, "enable_thinking": True},
        },
    )
    for request_id, budget in ((1, 5), (2, 0)):
        reasoning, answer = _texts(sink, request_id)
        kind, usage = sink.ends()[request_id]
        assert kind == "done"
        assert usage.get("reasoning_tokens", 0) == budget
        assert "</think>" not in reasoning + answer
        assert usage["content_tokens"] > 0 and answer
    # no budget: the random model never closes the block itself
    _, usage = sink.ends()[3]
    assert usage["reasoning_tokens"] == 40
