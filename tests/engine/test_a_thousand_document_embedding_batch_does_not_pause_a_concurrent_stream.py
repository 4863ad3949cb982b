"""An embedding request is embedded one document per engine step, between the decode
steps of the generating slots: a batch of 1,000 documents costs a stream beside it one
document's decode per token, and gives exactly what embedding it at once gives."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from paddler.agent.llama.embedder import Embedder, embed_documents
from paddler.protocol.desired_state import DEFAULT_INFERENCE_PARAMETERS
from paddler.protocol.requests import validate_request
from tests.engine.conftest import RecordingSink, state_for

DOCUMENTS = 1000
EMBEDDING = 1
STREAM = "the quick brown fox"


class _Collector:
    """The events of the one-shot path, for comparison."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.usage: dict[str, int] | None = None

    def tokens(
        self, request_id: int, pieces: list[str], token_ids: Sequence[int] | None = None
    ) -> None:
        raise AssertionError("an embedding request sends no tokens")

    def embedding(self, request_id: int, result: dict[str, Any]) -> None:
        self.results.append(result)

    def done(self, request_id: int, usage: dict[str, int], stop_sequence: Any = None) -> None:
        self.usage = usage

    def error(self, request_id: int, code: int, kind: str, description: str) -> None:
        raise AssertionError(f"{kind}: {description}")


def _documents() -> list[dict[str, str]]:
    return [
        {"id": f"d{i}", "content": f"document {i} about cats and dogs"} for i in range(DOCUMENTS)
    ]


def test_a_stream_beside_a_thousand_documents_waits_at_most_one_document_per_token(
    make_engine, tiny_model
) -> None:
    parameters = {"enable_embeddings": True, "pooling_type": "Mean", "embedding_batch_size": 64}
    engine = make_engine(slots=2, **parameters)
    request = {"input_batch": _documents(), "normalization_method": "L2"}
    sink = RecordingSink(engine)
    decodes_at_tokens: dict[int, list[int]] = {}
    original_tokens = sink.tokens

    def tokens(request_id: int, pieces: list[str], token_ids: Sequence[int] | None = None) -> None:
        decodes_at_tokens.setdefault(request_id, []).append(engine.embedding_decodes)
        original_tokens(request_id, pieces, token_ids)

    sink.tokens = tokens  # type: ignore[method-assign]

    engine.admit(EMBEDDING, validate_request(request))
    stream_id = 100
    engine.admit(stream_id, validate_request({"raw_prompt": STREAM, "max_tokens": 200}))
    for _ in range(20_000):
        if not engine.active_count():
            break
        engine.step(sink)
        ends = sink.ends()
        if stream_id in ends and EMBEDDING not in ends:
            assert ends[stream_id][0] == "done", ends[stream_id]
            stream_id += 1  # keep a stream running for as long as the embedding runs
            engine.admit(stream_id, validate_request({"raw_prompt": STREAM, "max_tokens": 200}))
    assert not engine.active_count()

    # the stream never waited for more than one document (two allowed) between tokens
    gaps = [
        later - earlier
        for decodes in decodes_at_tokens.values()
        for earlier, later in itertools.pairwise(decodes)
    ]
    assert gaps and max(gaps) <= 2, max(gaps)
    # ... and streams ran through the whole batch, not only its start or its end
    emissions = sorted(d for decodes in decodes_at_tokens.values() for d in decodes)
    assert emissions[0] <= 5 and emissions[-1] >= DOCUMENTS - 5
    assert engine.embedding_decodes == DOCUMENTS

    # every document's result, in order, as the one-shot path gives it
    results = sink.embeddings(EMBEDDING)
    assert [r["Embedding"]["source_document_id"] for r in results] == [
        d["id"] for d in _documents()
    ]
    kind, usage = sink.ends()[EMBEDDING]
    assert kind == "done"
    settings = {
        **DEFAULT_INFERENCE_PARAMETERS,
        **state_for(tiny_model, **parameters)["inference_parameters"],
    }
    reference = _Collector()
    with Embedder(engine.model, settings, n_threads=1) as embedder:
        embed_documents(reference, embedder, EMBEDDING, validate_request(request))
    assert usage == reference.usage
    for index in (0, 1, 2, 500, 998, 999):
        assert results[index] == reference.results[index]
    assert results == reference.results


def test_an_embedding_request_cancelled_half_way_ends_at_the_next_step(make_engine) -> None:
    engine = make_engine(enable_embeddings=True, pooling_type="Mean")
    sink = RecordingSink(engine)
    engine.admit(
        EMBEDDING,
        validate_request({"input_batch": _documents()[:50], "normalization_method": "None"}),
    )
    for _ in range(10):
        engine.step(sink)
    embedded = len(sink.embeddings(EMBEDDING))
    assert 0 < embedded < 50
    engine.cancel(EMBEDDING)
    engine.step(sink)
    kind, (code, error_kind, _) = sink.ends()[EMBEDDING]
    assert (kind, code, error_kind) == ("error", 499, "Cancelled")
    assert len(sink.embeddings(EMBEDDING)) == embedded
    assert not engine.active_count()


def test_two_embedding_requests_take_turns_and_a_swap_waits_for_both(
    make_engine, other_tiny_model
) -> None:
    engine = make_engine(enable_embeddings=True, pooling_type="Mean")
    sink = RecordingSink(engine)
    engine.admit(
        1, validate_request({"input_batch": _documents()[:20], "normalization_method": "L2"})
    )
    engine.admit(
        2, validate_request({"input_batch": _documents()[:3], "normalization_method": "L2"})
    )
    engine.step(sink)
    engine.apply_state(state_for(other_tiny_model, enable_embeddings=True))
    assert not engine.status().ready  # draining
    for _ in range(100):
        if not engine.active_count():
            break
        engine.step(sink)
    ends = sink.ends()
    assert ends[1][0] == ends[2][0] == "done"
    assert len(sink.embeddings(1)) == 20 and len(sink.embeddings(2)) == 3
    # the short request did not wait for the long one to end
    order = [rid for _, kind, rid, _ in sink.events if kind == "done"]
    assert order == [2, 1]
    assert engine.status().ready
    assert engine.status().model_path == str(other_tiny_model)
