"""``count_only``: the engine renders and tokenizes the prompt as a generation would,
ends the request with ``Done`` (``prompt_tokens``, ``content_tokens`` 0) without a
decode step, and counts a prompt longer than a slot too."""

from __future__ import annotations

from conftest import run

REQUEST = {"raw_prompt": "Once upon a time there was a tiny model", "max_tokens": 4}
CHAT = {
    "conversation_history": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there, who are you?"},
    ],
    "max_tokens": 4,
}


def test_the_count_is_the_prompt_a_generation_prefills(make_engine) -> None:
    engine = make_engine()
    for request in (REQUEST, CHAT):
        generated = run(engine, {1: request}).ends()[1][1]
        steps = engine.decode_steps
        counted = run(engine, {2: {**request, "count_only": True}})
        assert engine.decode_steps == steps  # nothing prefilled or generated
        assert counted.text() == {}
        kind, usage = counted.ends()[2]
        assert kind == "done"
        assert usage == {"prompt_tokens": generated["prompt_tokens"], "content_tokens": 0}


def test_a_prompt_longer_than_a_slot_is_counted(make_engine) -> None:
    engine = make_engine()
    long = {"raw_prompt": "word " * (2 * engine.n_ctx_seq), "max_tokens": 4}
    refused = run(engine, {1: long}).ends()[1]
    assert refused[0] == "error" and "PromptTooLong" in str(refused[1])
    kind, usage = run(engine, {2: {**long, "count_only": True}}).ends()[2]
    assert kind == "done" and usage["prompt_tokens"] > engine.n_ctx_seq
