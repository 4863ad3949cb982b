"""An exception while admitting, sampling, detokenizing, emitting or finishing one
request ends that request with a clear error; the others go on, and its slot (KV
cells included) serves the next request as if new."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import paddler.agent.llama.scheduler as scheduler
import paddler.agent.llama.slot as slot_module
from paddler.agent.llama.native import LlamaContext
from paddler.agent.llama_engine import LlamaEngine
from paddler.protocol.requests import validate_request
from tests.engine.conftest import RecordingSink, run

GOOD = {"raw_prompt": "hello world", "max_tokens": 12}
FAULTY = {"raw_prompt": "the faulty one", "max_tokens": 12}


def _serve(engine: LlamaEngine, sink: RecordingSink, requests: dict[int, dict[str, Any]]) -> None:
    for request_id, request in requests.items():
        engine.admit(request_id, validate_request(request))
    for _ in range(1000):
        if not engine.active_count():
            return
        engine.step(sink)
    raise AssertionError("requests did not finish")


def _check_the_others_and_the_freed_slot(
    engine: LlamaEngine, sink: RecordingSink, reference: str, kind: str
) -> str:
    """Request 1 (slot 0) ended with ``kind``; request 2 is whole; slot 0 serves anew."""
    ends = sink.ends()
    assert ends[1][0] == "error", ends[1]
    code, got_kind, description = ends[1][1]
    assert (code, got_kind) == (500, kind)
    assert ends[2] == ("done", {"prompt_tokens": 3, "content_tokens": 12})
    assert sink.text()[2] == reference
    assert engine.active_count() == 0
    # slot 0 is free with no cells left: the same prompt gives the same text on it
    again = run(engine, {3: GOOD})
    assert again.ends()[3][0] == "done" and again.text()[3] == reference
    return str(description)


def test_a_sampler_that_raises_ends_only_its_request(make_engine, monkeypatch) -> None:
    engine = make_engine(slots=2)
    reference = run(engine, {9: GOOD}).text()[9]
    real_build = scheduler.build_sampler

    def build(
        model: Any, parameters: Any, request: dict[str, Any], n_ctx: int, forced: Any = None
    ) -> Any:
        chain = real_build(model, parameters, request, n_ctx, forced)
        if request.get("raw_prompt") == FAULTY["raw_prompt"]:
            real_sample = chain.sample
            calls = {"n": 0}

            def sample(context: Any, index: int) -> int:
                calls["n"] += 1
                if calls["n"] == 4:
                    raise RuntimeError("the sampler broke")
                return real_sample(context, index)

            chain.sample = sample
        return chain

    monkeypatch.setattr(scheduler, "build_sampler", build)
    sink = RecordingSink(engine)
    _serve(engine, sink, {1: FAULTY, 2: GOOD})
    description = _check_the_others_and_the_freed_slot(engine, sink, reference, "SamplerError")
    assert "RuntimeError: the sampler broke" in description
    assert len([e for e in sink.events if e[1] == "tokens" and e[2] == 1]) == 3


def test_a_detokenization_that_raises_ends_only_its_request(make_engine, monkeypatch) -> None:
    engine = make_engine(slots=2)
    reference = run(engine, {9: GOOD}).text()[9]
    real_assembler = slot_module.TextAssembler

    class Breaking:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.pushes = 0

        @property
        def stopped(self) -> bool:
            return bool(self.inner.stopped)

        def push(self, piece: bytes) -> str:
            self.pushes += 1
            if self.pushes == 2:
                raise UnicodeError("a piece that is no text")
            return str(self.inner.push(piece))

        def finish(self) -> str:
            return str(self.inner.finish())

    def assembler(stop: list[str]) -> Any:
        inner = real_assembler(stop)
        return Breaking(inner) if "<never>" in stop else inner

    monkeypatch.setattr(slot_module, "TextAssembler", assembler)
    sink = RecordingSink(engine)
    _serve(engine, sink, {1: {**FAULTY, "stop": ["<never>"]}, 2: GOOD})
    description = _check_the_others_and_the_freed_slot(
        engine, sink, reference, "DetokenizationFailed"
    )
    assert "UnicodeError: a piece that is no text" in description


def test_a_request_that_cannot_be_admitted_ends_alone(make_engine, monkeypatch) -> None:
    engine = make_engine(slots=2)
    reference = run(engine, {9: GOOD}).text()[9]
    real_prompt_tokens = LlamaEngine._prompt_tokens

    def prompt_tokens(self: LlamaEngine, loaded: Any, request: dict[str, Any]) -> list[int]:
        if request.get("raw_prompt") == FAULTY["raw_prompt"]:
            raise KeyError("no such thing")
        return real_prompt_tokens(self, loaded, request)

    monkeypatch.setattr(LlamaEngine, "_prompt_tokens", prompt_tokens)
    sink = RecordingSink(engine)
    _serve(engine, sink, {1: FAULTY, 2: GOOD})
    ends = sink.ends()
    assert ends[1] == (
        "error",
        (500, "EngineFault", "the engine failed on this request: KeyError: 'no such thing'"),
    )
    assert ends[2][0] == "done" and sink.text()[2] == reference


def test_a_request_whose_text_cannot_be_sent_ends_alone(make_engine) -> None:
    engine = make_engine(slots=2)
    reference = run(engine, {9: GOOD}).text()[9]

    class RefusingSink(RecordingSink):
        def tokens(
            self, request_id: int, pieces: list[str], token_ids: Sequence[int] | None = None
        ) -> None:
            if request_id == 1 and len(self.text().get(1, "")) > 3:
                raise ValueError("cannot send this")
            super().tokens(request_id, pieces, token_ids)

    sink = RefusingSink(engine)
    _serve(engine, sink, {1: FAULTY, 2: GOOD})
    description = _check_the_others_and_the_freed_slot(engine, sink, reference, "EngineFault")
    assert "ValueError: cannot send this" in description


def test_a_request_whose_end_fails_ends_with_an_error(make_engine, monkeypatch) -> None:
    engine = make_engine(slots=2)
    reference = run(engine, {9: GOOD}).text()[9]

    class RefusingSink(RecordingSink):
        def done(self, request_id: int, usage: dict[str, int], stop_sequence: Any = None) -> None:
            if request_id == 1:
                raise RuntimeError("cannot end it")
            super().done(request_id, usage)

    sink = RefusingSink(engine)
    _serve(engine, sink, {1: FAULTY, 2: GOOD})
    description = _check_the_others_and_the_freed_slot(engine, sink, reference, "EngineFault")
    assert "RuntimeError: cannot end it" in description


def test_kv_cells_that_could_not_be_freed_are_freed_before_the_slot_serves_again(
    make_engine, monkeypatch
) -> None:
    engine = make_engine(slots=1)
    reference = run(make_engine(slots=1), {9: GOOD}).text()[9]
    real_forget = LlamaContext.forget
    real_decode = LlamaContext.decode
    calls = {"forget": 0, "decode": 0}

    def forget_fails_once(self: LlamaContext, seq_id: int) -> None:
        calls["forget"] += 1
        if calls["forget"] == 1:
            raise OSError("not now")
        real_forget(self, seq_id)

    def decode_fails_once(self: LlamaContext, batch: Any) -> int:
        calls["decode"] += 1
        return -1 if calls["decode"] == 3 else real_decode(self, batch)

    monkeypatch.setattr(LlamaContext, "forget", forget_fails_once)
    monkeypatch.setattr(LlamaContext, "decode", decode_fails_once)
    # a failed decode leaves the cells of its batch in doubt: they are freed, and
    # freeing them fails this once
    first = run(engine, {1: GOOD})
    assert first.ends()[1][1][1] == "DecodeFailed"
    # the one slot still held the cells of request 1; they were freed before request 2
    second = run(engine, {2: GOOD})
    assert second.ends()[2][0] == "done" and second.text()[2] == reference
    assert second.ends()[2][1].get("cached_prompt_tokens", 0) == 0
    assert calls["forget"] >= 2
