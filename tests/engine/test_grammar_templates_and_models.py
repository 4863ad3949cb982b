from __future__ import annotations

import json

import jsonschema
import pytest

from paddler.protocol.requests import validate_request
from tests.engine.conftest import RecordingSink, run, state_for


def test_a_gbnf_grammar_constrains_the_output(make_engine) -> None:
    engine = make_engine()
    grammar = {"type": "gbnf", "grammar": 'root ::= ("yes" | "no") " " [a-z]{3}', "root": "root"}
    sink = run(
        engine,
        {
            i: {
                "raw_prompt": f"answer {i}",
                "max_tokens": 20,
                "grammar": grammar,
                "temperature": 1.0,
                "seed": i,
            }
            for i in range(4)
        },
    )
    for text in sink.text().values():
        head, tail = text.split(" ")
        assert head in ("yes", "no") and len(tail) == 3 and tail.isalpha()
    assert all(kind == "done" for kind, _ in sink.ends().values())


def test_a_json_schema_request_yields_json_that_validates(make_engine) -> None:
    engine = make_engine()
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer"},
            "kind": {"enum": ["cat", "dog"]},
        },
        "required": ["name", "age", "kind"],
        "additionalProperties": False,
    }
    grammar = {"type": "json_schema", "schema": json.dumps(schema)}
    sink = run(
        engine,
        {
            i: {
                "raw_prompt": "person:",
                "max_tokens": 200,
                "grammar": grammar,
                "temperature": 0.7,
                "seed": i,
            }
            for i in range(3)
        },
    )
    for request_id, text in sink.text().items():
        assert sink.ends()[request_id][0] == "done", text
        jsonschema.validate(json.loads(text), schema)


def test_output_the_grammar_cannot_constrain_is_checked_against_the_schema(make_engine) -> None:
    # llama-cpp-python's schema converter ignores number ranges: the engine checks
    # the finished output and reports a mismatch instead of returning invalid JSON
    engine = make_engine()
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "maximum": -1}},
        "required": ["n"],
        "additionalProperties": False,
    }
    grammar = {"type": "json_schema", "schema": json.dumps(schema)}
    sink = run(engine, {1: {"raw_prompt": "n:", "max_tokens": 100, "grammar": grammar}})
    kind, value = sink.ends()[1]
    text = sink.text()[1]
    if json.loads(text)["n"] <= -1:  # the model happened to comply
        assert kind == "done"
    else:
        assert kind == "error" and value[1] == "GrammarRejectedModelOutput"
        assert "maximum" in value[2] or "-1" in value[2]


def test_bad_grammars_end_only_their_request_with_the_error_kind(make_engine) -> None:
    engine = make_engine()
    sink = run(
        engine,
        {
            1: {
                "raw_prompt": "x",
                "max_tokens": 5,
                "grammar": {"type": "gbnf", "grammar": "root ::= ("},
            },
            2: {
                "raw_prompt": "x",
                "max_tokens": 5,
                "grammar": {"type": "json_schema", "schema": "{not json"},
            },
            3: {"raw_prompt": "x", "max_tokens": 5},
        },
    )
    ends = sink.ends()
    assert ends[1][0] == "error" and ends[1][1][1] == "GrammarSyntaxError"
    assert ends[2][0] == "error" and ends[2][1][1] == "GrammarSyntaxError"
    assert ends[3][0] == "done"


def test_a_conversation_is_rendered_with_the_model_template_without_a_double_bos(
    make_engine,
) -> None:
    engine = make_engine()
    model = engine.model
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello."},
    ]
    request = validate_request({"conversation_history": conversation, "max_tokens": 3})
    tokens = engine._prompt_tokens(engine._loaded, request)
    bos = 1
    assert tokens[0] == bos and tokens[1] != bos
    text = engine._loaded.template.render(conversation)
    assert "Say hello." in text and text.startswith(model.bos_token)
    sink = run(engine, {1: {"conversation_history": conversation, "max_tokens": 3}})
    assert sink.ends()[1] == ("done", {"prompt_tokens": len(tokens), "content_tokens": 3})


def test_a_template_error_ends_the_request_with_a_readable_message(make_engine, tiny_model) -> None:
    engine = make_engine()
    state = state_for(tiny_model)
    state["chat_template_override"] = {
        "content": "{{ raise_exception('only user turns, please') }}"
    }
    state["use_chat_template_override"] = True
    engine.apply_state(state)
    assert engine.status().uses_chat_template_override
    sink = run(
        engine,
        {
            1: {"conversation_history": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            2: {"raw_prompt": "raw still works", "max_tokens": 2},
        },
    )
    kind, (code, error_kind, message) = sink.ends()[1]
    assert (kind, code, error_kind) == ("error", 400, "ChatTemplateError")
    assert "only user turns, please" in message
    assert sink.ends()[2][0] == "done"


def test_a_template_that_does_not_compile_is_an_issue(make_engine, tiny_model) -> None:
    engine = make_engine()
    state = state_for(tiny_model)
    state["chat_template_override"] = {"content": "{% for %}"}
    state["use_chat_template_override"] = True
    engine.apply_state(state)
    issues = engine.status().issues
    assert len(issues) == 1 and "ChatTemplateDoesNotCompile" in issues[0]


def test_a_missing_model_file_is_an_issue_and_the_engine_keeps_running(
    make_engine, tiny_model, tmp_path
) -> None:
    from paddler.agent.llama_engine import LlamaEngine, resolve_local

    engine = LlamaEngine(1, n_threads=1, resolver=resolve_local)
    try:
        missing = tmp_path / "nope.gguf"
        engine.apply_state({"model": {"LocalToAgent": str(missing)}})
        status = engine.status()
        assert not status.ready
        assert status.issues == [{"ModelFileDoesNotExist": {"model_path": str(missing)}}]
        assert status.state_application_status == "AttemptedAndNotAppliable"
        not_a_model = tmp_path / "text.gguf"
        not_a_model.write_text("not a gguf file")
        engine.apply_state({"model": {"LocalToAgent": str(not_a_model)}})
        assert "ModelCannotBeLoaded" in engine.status().issues[0]
        engine.apply_state(state_for(tiny_model))
        assert engine.status().ready and engine.status().issues == []
    finally:
        engine.close()


def test_a_model_swap_under_load_drops_no_request(make_engine, other_tiny_model) -> None:
    engine = make_engine(slots=2)
    sink = RecordingSink(engine)
    for request_id in (1, 2):
        engine.admit(request_id, validate_request({"raw_prompt": "go", "max_tokens": 30}))
    for _ in range(3):
        engine.step(sink)
    engine.apply_state(state_for(other_tiny_model))
    assert not engine.status().ready  # draining: the broker stops dispatching here
    engine.admit(3, validate_request({"raw_prompt": "late", "max_tokens": 5}))
    while engine.active_count():
        engine.step(sink)
    ends = sink.ends()
    assert {rid: kind for rid, (kind, _) in ends.items()} == {1: "done", 2: "done", 3: "done"}
    assert ends[1][1]["content_tokens"] == 30
    status = engine.status()
    assert status.ready and status.model_path == str(other_tiny_model)


@pytest.mark.parametrize("normalize", [False])
def test_model_metadata_is_read_as_strings(make_engine, normalize) -> None:
    engine = make_engine()
    metadata = engine.model.metadata
    assert metadata["general.architecture"] == "llama"
    assert (
        "tokenizer.chat_template" in metadata and "messages" in metadata["tokenizer.chat_template"]
    )
