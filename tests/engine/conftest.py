from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from paddler.agent.llama_engine import LlamaEngine
from paddler.protocol.requests import validate_request
from paddler.testing.tiny_model import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-seed-7.gguf", seed=7)


class RecordingSink:
    """Collects engine events with the decode step they came after."""

    def __init__(self, engine: LlamaEngine) -> None:
        self.engine = engine
        self.events: list[tuple[int, str, int, Any]] = []
        self.stops: dict[int, str] = {}
        self.flushes: list[tuple[int, int]] = []
        """``(decode steps so far, events so far)`` at each ``flush``."""
        self.frames: dict[int, list[tuple[str, list[int]]]] = defaultdict(list)
        """Each request's token frames: their text and the token ids they carried."""

    def tokens(
        self, request_id: int, pieces: list[str], token_ids: Sequence[int] | None = None
    ) -> None:
        self.events.append((self.engine.decode_steps, "tokens", request_id, pieces))
        self.frames[request_id].append(("".join(pieces), list(token_ids or ())))

    def reasoning(
        self, request_id: int, pieces: list[str], token_ids: Sequence[int] | None = None
    ) -> None:
        self.events.append((self.engine.decode_steps, "reasoning", request_id, pieces))
        self.frames[request_id].append(("".join(pieces), list(token_ids or ())))

    def tool_call(
        self, request_id: int, pieces: list[str], token_ids: Sequence[int] | None = None
    ) -> None:
        self.events.append((self.engine.decode_steps, "tool_call", request_id, pieces))
        self.frames[request_id].append(("".join(pieces), list(token_ids or ())))

    def tool_calls(self, request_id: int, outcome: dict[str, Any]) -> None:
        self.events.append((self.engine.decode_steps, "tool_calls", request_id, outcome))

    def logprobs(self, request_id: int, entries: list[dict[str, Any]]) -> None:
        self.events.append((self.engine.decode_steps, "logprobs", request_id, entries))

    def embedding(self, request_id: int, result: dict[str, Any]) -> None:
        self.events.append((self.engine.decode_steps, "embedding", request_id, result))

    def flush(self) -> None:
        self.flushes.append((self.engine.decode_steps, len(self.events)))

    def done(
        self, request_id: int, usage: dict[str, int], stop_sequence: str | None = None
    ) -> None:
        self.events.append((self.engine.decode_steps, "done", request_id, usage))
        if stop_sequence is not None:
            self.stops[request_id] = stop_sequence

    def error(self, request_id: int, code: int, kind: str, description: str) -> None:
        self.events.append(
            (self.engine.decode_steps, "error", request_id, (code, kind, description))
        )

    def text(self) -> dict[int, str]:
        out: dict[int, str] = defaultdict(str)
        for _, kind, request_id, value in self.events:
            if kind == "tokens":
                out[request_id] += "".join(value)
        return dict(out)

    def ends(self) -> dict[int, tuple[str, Any]]:
        return {
            rid: (kind, value)
            for _, kind, rid, value in self.events
            if kind
            not in ("tokens", "embedding", "logprobs", "reasoning", "tool_call", "tool_calls")
        }

    def embeddings(self, request_id: int) -> list[dict[str, Any]]:
        return [v for _, kind, rid, v in self.events if kind == "embedding" and rid == request_id]


def local_resolver(source: Any, progress: Any) -> Path | None:
    if source == "None":
        return None
    return Path(source["LocalToAgent"])


def state_for(model: Path, **parameters: Any) -> dict[str, Any]:
    base = {
        "context_size": 256,
        "temperature": 0.0,
        "penalty_repeat": 1.0,
        "penalty_presence": 0.0,
        "n_batch": 512,
    }
    return {"model": {"LocalToAgent": str(model)}, "inference_parameters": {**base, **parameters}}


@pytest.fixture
def make_engine(tiny_model: Path) -> Iterator[Any]:
    engines: list[LlamaEngine] = []

    def make(slots: int = 4, model: Path | None = None, **parameters: Any) -> LlamaEngine:
        engine = LlamaEngine(slots, n_threads=1, resolver=local_resolver)
        engines.append(engine)
        engine.apply_state(state_for(model or tiny_model, **parameters))
        assert engine.status().ready, engine.status()
        return engine

    yield make
    for engine in engines:
        engine.close()


def run(
    engine: LlamaEngine, requests: dict[int, dict[str, Any]], max_steps: int = 10_000
) -> RecordingSink:
    sink = RecordingSink(engine)
    for request_id, request in requests.items():
        engine.admit(request_id, validate_request(request))
    for _ in range(max_steps):
        if not engine.active_count():
            break
        engine.step(sink)
    assert not engine.active_count(), "requests did not finish"
    return sink
