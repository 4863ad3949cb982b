"""A request continued from the tokens another agent generated (its agent was lost)
goes on exactly where that agent stopped: greedy output identical to an
uninterrupted run, from every cut the broker can see (every token frame), with stop
strings across the seam, a grammar's state and ``max_tokens`` counting the whole
answer; tokens that cannot be this model's output are refused, not crashed on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import RecordingSink, local_resolver, run

from paddler.agent.llama_engine import LlamaEngine
from paddler.protocol.codec import pack_token_ids
from paddler.protocol.requests import CONTINUATION, validate_request


def _frames(sink: RecordingSink, request_id: int) -> list[tuple[str, list[int]]]:
    return sink.frames[request_id]


def _continued(request: dict[str, Any], token_ids: list[int]) -> dict[str, Any]:
    wire = validate_request(request)
    wire[CONTINUATION] = {"token_ids": pack_token_ids(token_ids)}
    return wire


def _serve(engine: LlamaEngine, request: dict[str, Any]) -> RecordingSink:
    sink = RecordingSink(engine)
    engine.admit(5, request)
    for _ in range(10_000):
        if not engine.active_count():
            break
        engine.step(sink)
    assert not engine.active_count()
    return sink


def _check_every_cut(
    reference_engine: LlamaEngine, other_engine: LlamaEngine, request: dict[str, Any]
) -> list[tuple[str, list[int]]]:
    """Continue ``request`` on ``other_engine`` from every frame boundary of an
    uninterrupted run on ``reference_engine``: the text the client already had plus
    the continuation's is the uninterrupted text, and the usage is the same."""
    reference = run(reference_engine, {1: request})
    frames = _frames(reference, 1)
    whole = reference.text()[1]
    assert reference.ends()[1][0] == "done"
    usage = reference.ends()[1][1]
    usage.pop("cached_prompt_tokens", None)
    assert sum(len(ids) for _, ids in frames) >= len(frames) > 3
    for cut in range(1, len(frames)):
        sent = "".join(text for text, _ in frames[:cut])
        token_ids = [token for _, ids in frames[:cut] for token in ids]
        sink = _serve(other_engine, _continued(request, token_ids))
        kind, continued_usage = sink.ends()[5]
        # the same usage; what it found cached in the other engine's slot may differ
        continued_usage.pop("cached_prompt_tokens", None)
        assert (kind, continued_usage) == ("done", usage), f"cut after frame {cut}"
        assert sent + sink.text().get(5, "") == whole, f"cut after frame {cut}"
    return frames


def test_a_greedy_request_continued_from_any_frame_gives_the_uninterrupted_text(
    make_engine,
) -> None:
    request = {"raw_prompt": "Once upon a time", "max_tokens": 40}
    _check_every_cut(make_engine(slots=2), make_engine(slots=2), request)


def test_a_conversation_continues_and_usage_counts_its_own_prompt(make_engine) -> None:
    request = {
        "conversation_history": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 24,
    }
    _check_every_cut(make_engine(slots=1), make_engine(slots=3), request)


def test_a_stop_string_spanning_the_seam_still_stops(make_engine) -> None:
    engine, other = make_engine(slots=1), make_engine(slots=1)
    unstopped = run(engine, {1: {"raw_prompt": "Once upon a time", "max_tokens": 60}}).text()[1]
    start = len(unstopped) // 2
    stop = unstopped[start : start + 5]
    assert unstopped.find(stop) == start and len(stop.strip()) >= 3
    # a stop string that never completes holds text back all along (its start
    # keeps appearing), so seams fall inside held-back text
    false_start = unstopped[2:6] + "\x01"
    request = {"raw_prompt": "Once upon a time", "max_tokens": 60, "stop": [false_start, stop]}
    frames = _check_every_cut(engine, other, request)
    # a frame carried ids of tokens whose text had been held back: a cut before it
    # was a seam inside held-back text
    assert any(len(ids) > 1 for _, ids in frames)
    assert run(engine, {1: request}).text()[1] == unstopped[:start]


def test_a_grammar_request_resumes_its_grammar_state(make_engine) -> None:
    grammar = {
        "type": "gbnf",
        "grammar": 'root ::= "{" item ("," item)* "}"\nitem ::= [a-z]+ ":" [0-9]+',
        "root": "root",
    }
    request = {"raw_prompt": "Give me pairs", "max_tokens": 30, "grammar": grammar}
    _check_every_cut(make_engine(slots=1), make_engine(slots=1), request)


def test_a_json_schema_request_continued_is_checked_on_its_whole_output(make_engine) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}},
        "required": ["name"],
    }
    grammar = {"type": "json_schema", "schema": json.dumps(schema)}
    request = {"raw_prompt": "A person", "max_tokens": 60, "grammar": grammar}
    _check_every_cut(make_engine(slots=1), make_engine(slots=1), request)


def test_a_seeded_request_keeps_its_seed(make_engine) -> None:
    engine = make_engine(slots=1, temperature=0.9)
    request = {"raw_prompt": "Once upon a time", "max_tokens": 20, "seed": 1234}
    frames = _frames(run(engine, {1: request}), 1)
    token_ids = [token for _, ids in frames[:4] for token in ids]
    texts = {_serve(engine, _continued(request, token_ids)).text()[5] for _ in range(3)}
    assert len(texts) == 1  # the same seed each time, not a fresh one


@pytest.mark.parametrize(
    ("token_ids", "problem"),
    [
        ([3, 10**6], "continued token 1 (1000000) is not in this model's vocabulary"),
        ([3, -1], "continued token 1 (-1) is not in this model's vocabulary"),
        ([3, "eos"], "ends generation"),
    ],
)
def test_tokens_that_cannot_be_this_models_output_are_refused(
    make_engine, token_ids: list[Any], problem: str
) -> None:
    engine = make_engine(slots=1)
    model = engine.model
    assert model is not None
    eog = next(token for token in range(model.n_vocab) if model.is_eog(token))
    ids = [eog if token == "eos" else token for token in token_ids]
    sink = _serve(engine, _continued({"raw_prompt": "x", "max_tokens": 5}, ids))
    kind, (code, error, description) = sink.ends()[5]
    assert (kind, code, error) == ("error", 400, "InvalidContinuation")
    assert problem in description
    # the engine goes on serving
    assert run(engine, {1: {"raw_prompt": "x", "max_tokens": 3}}).ends()[1][0] == "done"


def test_a_token_the_grammar_refuses_ends_the_request_not_the_agent(make_engine) -> None:
    engine = make_engine(slots=1)
    model = engine.model
    assert model is not None
    digits = {"type": "gbnf", "grammar": 'root ::= [0-9]+ "."', "root": "root"}
    letter = model.tokenize("a", add_special=False)[-1]
    request = {"raw_prompt": "Count", "max_tokens": 8, "grammar": digits}
    sink = _serve(engine, _continued(request, [letter]))
    kind, (code, error, description) = sink.ends()[5]
    assert (kind, code, error) == ("error", 400, "InvalidContinuation")
    assert "refused by the request's grammar" in description
    assert run(engine, {1: request}).ends()[1][0] == "done"


def test_max_tokens_counts_the_tokens_generated_before_the_seam(make_engine) -> None:
    engine = make_engine(slots=1)
    request = {"raw_prompt": "Once upon a time", "max_tokens": 12}
    frames = _frames(run(engine, {1: request}), 1)
    token_ids = [token for _, ids in frames[:5] for token in ids]
    sink = _serve(engine, _continued(request, token_ids))
    assert sink.ends()[5][1]["content_tokens"] == 12
    assert sum(len(ids) for _, ids in sink.frames[5]) == 12 - len(token_ids)


def test_a_continuation_longer_than_a_slot_is_refused(make_engine) -> None:
    engine = make_engine(slots=1)
    too_many = [5] * engine.n_ctx_seq
    sink = _serve(engine, _continued({"raw_prompt": "x", "max_tokens": 5000}, too_many))
    assert sink.ends()[5][1][:2] == (400, "PromptTooLong")


def test_a_greedy_answer_continued_near_a_tie_is_the_same_to_the_character(
    tiny_model,
) -> None:
    # this conversation's greedy answer has a near tie a little after character 200:
    # the tokens before it prefilled as a batch (rather than decoded one a step, as
    # they were generated) tipped it
    request = {
        "conversation_history": [{"role": "user", "content": "Once upon a time"}],
        "max_tokens": 80,
    }
    # as a cluster serves it: the desired state's defaults, two threads, and a fresh
    # agent for each continuation
    state = {
        "model": {"LocalToAgent": str(tiny_model)},
        "inference_parameters": {"context_size": 1024, "temperature": 0.0},
    }

    def agent() -> LlamaEngine:
        engine = LlamaEngine(2, n_threads=2, resolver=local_resolver)
        engine.apply_state(state)
        return engine

    engine = agent()
    try:
        reference = run(engine, {1: request})
    finally:
        engine.close()
    frames, whole = reference.frames[1], reference.text()[1]
    assert len(frames) == 80
    for cut in range(40, 60):
        other = agent()
        try:
            continued = validate_request(request)
            token_ids = [token for _, ids in frames[:cut] for token in ids]
            continued[CONTINUATION] = {"token_ids": pack_token_ids(token_ids)}
            sink = RecordingSink(other)
            other.admit(7, continued)
            while other.active_count():
                other.step(sink)
        finally:
            other.close()
        sent = "".join(text for text, _ in frames[:cut])
        assert sent + sink.text().get(7, "") == whole, cut
