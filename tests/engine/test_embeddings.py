from __future__ import annotations

import math

from tests.engine.conftest import run


def _docs(*texts: str) -> list[dict[str, str]]:
    return [{"id": f"d{i}", "content": text} for i, text in enumerate(texts)]


def test_embeddings_have_the_model_width_and_the_requested_norm(make_engine) -> None:
    engine = make_engine(enable_embeddings=True, pooling_type="Mean")
    width = engine.model.n_embd
    methods = {1: "None", 2: "L2", 3: {"RmsNorm": {"epsilon": 1e-6}}}
    sink = run(
        engine,
        {
            rid: {"input_batch": _docs("hello world", "the cat"), "normalization_method": method}
            for rid, method in methods.items()
        },
    )
    for request_id, method in methods.items():
        results = sink.embeddings(request_id)
        assert [r["Embedding"]["source_document_id"] for r in results] == ["d0", "d1"]
        for result in results:
            vector = result["Embedding"]["embedding"]
            assert len(vector) == width
            assert result["Embedding"]["normalization_method"] == method
            assert result["Embedding"]["pooling_type"] == "Mean"
            if method == "L2":
                assert math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, rel_tol=1e-5)
            if isinstance(method, dict):
                rms = math.sqrt(sum(v * v for v in vector) / width)
                assert math.isclose(rms, 1.0, rel_tol=1e-3)
        assert sink.ends()[request_id][0] == "done"
    raw = sink.embeddings(1)[0]["Embedding"]["embedding"]
    unit = sink.embeddings(2)[0]["Embedding"]["embedding"]
    norm = math.sqrt(sum(v * v for v in raw))
    assert all(
        math.isclose(a / norm, b, rel_tol=1e-4, abs_tol=1e-6)
        for a, b in zip(raw, unit, strict=True)
    )
    # different documents, different vectors
    assert (
        sink.embeddings(1)[0]["Embedding"]["embedding"]
        != sink.embeddings(1)[1]["Embedding"]["embedding"]
    )


def test_a_document_too_long_for_the_batch_is_reported_and_the_rest_embedded(make_engine) -> None:
    engine = make_engine(enable_embeddings=True, embedding_batch_size=32)
    sink = run(
        engine,
        {
            1: {"input_batch": _docs("word " * 100, "short"), "normalization_method": "L2"},
            2: {"raw_prompt": "generation still works", "max_tokens": 3},
        },
    )
    first, second = sink.embeddings(1)
    assert first["DocumentExceedsBatchSize"]["source_document_id"] == "d0"
    assert first["DocumentExceedsBatchSize"]["embedding_batch_size"] == 32
    assert second["Embedding"]["source_document_id"] == "d1"
    assert sink.ends()[1][0] == "done" and sink.ends()[2][0] == "done"


def test_embeddings_off_in_the_desired_state_answers_embeddings_disabled(make_engine) -> None:
    engine = make_engine()
    sink = run(engine, {1: {"input_batch": _docs("x"), "normalization_method": "None"}})
    kind, (_code, error_kind, message) = sink.ends()[1]
    assert (kind, error_kind) == ("error", "EmbeddingsDisabled")
    assert "enable_embeddings" in message
