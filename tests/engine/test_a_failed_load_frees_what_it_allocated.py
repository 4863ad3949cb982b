"""A model load that fails half way frees every native handle it already holds.

``NativeLedger`` wraps llama.cpp's allocators and their frees (on the ``llama_cpp``
module, where ``paddler.agent.llama.native`` looks them up at each call) and counts
what is still allocated; a step of the load is then made to fail.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from paddler.agent.llama import loading, native
from paddler.agent.llama.embedder import Embedder
from paddler.agent.llama_engine import LlamaEngine
from paddler.errors import EngineError
from paddler.protocol.desired_state import DEFAULT_INFERENCE_PARAMETERS
from tests.engine.conftest import local_resolver, run, state_for


class NativeLedger:
    """Live llama.cpp models, contexts and batches, by kind."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live: Counter[str] = Counter()
        self.fail: set[str] = set()
        lc = native.lc
        self._wrap(monkeypatch, lc, "llama_model_load_from_file", "model", +1, null=True)
        self._wrap(monkeypatch, lc, "llama_model_free", "model", -1)
        self._wrap(monkeypatch, lc, "llama_init_from_model", "context", +1, null=True)
        self._wrap(monkeypatch, lc, "llama_free", "context", -1)
        self._wrap(monkeypatch, lc, "llama_batch_init", "batch", +1)
        self._wrap(monkeypatch, lc, "llama_batch_free", "batch", -1)

    def _wrap(
        self,
        monkeypatch: pytest.MonkeyPatch,
        lc: Any,
        name: str,
        kind: str,
        change: int,
        *,
        null: bool = False,
    ) -> None:
        real = getattr(lc, name)

        def wrapper(*args: Any) -> Any:
            if change > 0 and kind in self.fail:
                if null:
                    return None  # llama.cpp's failure: a NULL handle
                raise MemoryError(f"{name} failed (test)")
            result = real(*args)
            if change < 0 or not null or result:
                self.live[kind] += change
            return result

        monkeypatch.setattr(lc, name, wrapper)

    def held(self) -> dict[str, int]:
        return {kind: count for kind, count in self.live.items() if count}


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> NativeLedger:
    return NativeLedger(monkeypatch)


@pytest.fixture
def engine() -> Any:
    engine = LlamaEngine(1, n_threads=1, resolver=local_resolver)
    yield engine
    engine.close()


def load_issue(engine: LlamaEngine) -> str:
    status = engine.status()
    assert not status.ready
    assert status.state_application_status == "AttemptedAndNotAppliable"
    (issue,) = status.issues
    return str(issue["ModelCannotBeLoaded"]["error"])


def test_a_failed_context_frees_the_model(
    engine: LlamaEngine, ledger: NativeLedger, tiny_model: Path
) -> None:
    ledger.fail.add("context")
    engine.apply_state(state_for(tiny_model))
    assert "could not create a context" in load_issue(engine)
    assert ledger.held() == {}


def test_a_failed_batch_frees_the_context_and_the_model(
    engine: LlamaEngine, ledger: NativeLedger, tiny_model: Path
) -> None:
    ledger.fail.add("batch")
    engine.apply_state(state_for(tiny_model))
    assert "llama_batch_init failed" in load_issue(engine)
    assert ledger.held() == {}


def test_a_failure_after_every_handle_frees_them_all(
    engine: LlamaEngine,
    ledger: NativeLedger,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("template selection failed (test)")

    monkeypatch.setattr(loading, "choose_template", broken)
    engine.apply_state(state_for(tiny_model))
    assert "template selection failed" in load_issue(engine)
    assert ledger.held() == {}


def test_a_model_that_fails_after_loading_is_freed(
    ledger: NativeLedger, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("no vocabulary (test)")

    monkeypatch.setattr(native.lc, "llama_model_get_vocab", broken)
    with pytest.raises(RuntimeError, match="no vocabulary"):
        native.LlamaModel(tiny_model)
    assert ledger.held() == {}


def test_an_embedder_that_fails_half_way_frees_its_context(
    ledger: NativeLedger, tiny_model: Path
) -> None:
    parameters = {**DEFAULT_INFERENCE_PARAMETERS, "pooling_type": "Mean"}
    with native.LlamaModel(tiny_model) as model:
        ledger.fail.add("batch")
        with pytest.raises(MemoryError):
            Embedder(model, parameters, 1)
        assert ledger.held() == {"model": 1}
        ledger.fail.clear()
        ledger.fail.add("context")
        with pytest.raises(EngineError, match="could not create an embedding context"):
            Embedder(model, parameters, 1)
        assert ledger.held() == {"model": 1}
    assert ledger.held() == {}


def test_the_engine_recovers_and_frees_everything_on_close(
    ledger: NativeLedger, tiny_model: Path
) -> None:
    engine = LlamaEngine(2, n_threads=1, resolver=local_resolver)
    try:
        ledger.fail.add("context")
        engine.apply_state(state_for(tiny_model))
        assert ledger.held() == {}
        ledger.fail.clear()
        engine.apply_state(state_for(tiny_model, enable_embeddings=True, pooling_type="Mean"))
        assert engine.status().ready
        sink = run(
            engine,
            {
                1: {"raw_prompt": "hello", "max_tokens": 3},
                2: {"input_batch": [{"id": "d", "content": "hello"}]},
            },
        )
        assert {rid: kind for rid, (kind, _) in sink.ends().items()} == {1: "done", 2: "done"}
        # the model, its context and batch, the embedder's context and batch
        assert ledger.held() == {"model": 1, "context": 2, "batch": 2}
    finally:
        engine.close()
    assert ledger.held() == {}
