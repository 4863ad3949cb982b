"""``llama_decode`` failures, by return code, with the real engine on the tiny model:
1 (no room in the KV cache) takes the step again with smaller prompt chunks, and
ends a request only when decode tokens alone do not fit; an error (negative) ends
the requests whose tokens were in that batch, and the engine goes on."""

from __future__ import annotations

from typing import Any

import paddler.agent.llama_engine as module
from paddler.protocol.requests import validate_request
from tests.engine.conftest import RecordingSink, run

LONG = {"raw_prompt": "a much longer prompt with many words " * 5, "max_tokens": 10}
SHORT = {"raw_prompt": "hello world", "max_tokens": 10}


def test_no_room_for_prompt_chunks_retries_with_smaller_chunks_and_loses_nothing(
    make_engine, monkeypatch
) -> None:
    engine = make_engine(slots=2)
    reference = run(make_engine(slots=2), {1: LONG, 2: SHORT}).text()
    real_decode = module.lc.llama_decode
    sizes: list[tuple[int, int]] = []

    def room_for_eight(context: Any, batch: Any) -> int:
        result = 1 if batch.n_tokens > 8 else real_decode(context, batch)
        sizes.append((batch.n_tokens, result))
        return int(result)

    monkeypatch.setattr(module.lc, "llama_decode", room_for_eight)
    sink = run(engine, {1: LONG, 2: SHORT})
    assert sink.text() == reference
    assert {rid: end[0] for rid, end in sink.ends().items()} == {1: "done", 2: "done"}
    assert sink.ends()[1][1]["content_tokens"] == 10
    # the first try held both prompts; each retry held half the prompt tokens
    first_failed = sizes[0]
    assert first_failed[1] == 1 and first_failed[0] > 40
    assert sizes[1][0] == first_failed[0] // 2
    assert all(size <= 8 for size, result in sizes if result == 0)


def test_no_room_even_for_decode_tokens_alone_ends_the_request_holding_the_most_cells(
    make_engine, monkeypatch
) -> None:
    engine = make_engine(slots=2)
    reference = run(engine, {2: LONG}).text()[2]
    sink = RecordingSink(engine)
    engine.admit(1, validate_request(SHORT))
    engine.step(sink)
    engine.step(sink)  # request 1 generates and holds cells
    engine.admit(2, validate_request(LONG))
    real_decode = module.lc.llama_decode
    sizes: list[int] = []

    def full(context: Any, batch: Any) -> int:
        sizes.append(batch.n_tokens)
        return 1

    monkeypatch.setattr(module.lc, "llama_decode", full)
    engine.step(sink)  # every try of this step finds the cache full
    prompt = sizes[0] - 1
    assert prompt > 40
    # request 2's chunk halved down to one token, then request 1's token alone
    expected = [1 + prompt]
    while expected[-1] > 1:
        expected.append(1 + (expected[-1] - 1) // 2)
    assert sizes == expected
    assert sink.ends() == {
        1: ("error", (503, "KvCacheExhausted", sink.ends()[1][1][2])),
    }
    monkeypatch.setattr(module.lc, "llama_decode", real_decode)
    while engine.active_count():
        engine.step(sink)
    assert sink.ends()[2][0] == "done" and sink.text()[2] == reference


def test_a_decode_error_ends_the_requests_in_its_batch_and_the_engine_goes_on(
    make_engine, monkeypatch
) -> None:
    engine = make_engine(slots=3, n_batch=16)
    waiting = {"raw_prompt": "the third prompt is here", "max_tokens": 10}
    reference = run(engine, {3: waiting}).text()[3]
    sink = RecordingSink(engine)
    engine.admit(1, validate_request(SHORT))
    engine.step(sink)  # request 1 prefilled
    engine.admit(2, validate_request(LONG))
    engine.admit(3, validate_request(waiting))
    real_decode = module.lc.llama_decode
    calls = {"n": 0}
    seen: list[set[int]] = []

    def error_once(context: Any, batch: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            seen.append({batch.seq_id[i][0] for i in range(batch.n_tokens)})
            return -1
        return int(real_decode(context, batch))

    monkeypatch.setattr(module.lc, "llama_decode", error_once)
    # this step: request 1's token and 15 of request 2's prompt tokens; request 3 waits
    while engine.active_count():
        engine.step(sink)
    assert seen == [{0, 1}]
    ends = sink.ends()
    for request_id in (1, 2):
        assert ends[request_id] == ("error", (500, "DecodeFailed", "llama_decode returned -1"))
    assert ends[3][0] == "done" and sink.text()[3] == reference
    # the failed requests' slots are whole again
    after = run(engine, {4: SHORT, 5: waiting, 6: LONG})
    assert after.text()[5] == reference
    assert {rid: end[0] for rid, end in after.ends().items()} == {4: "done", 5: "done", 6: "done"}


def test_an_aborted_decode_also_ends_only_its_batch(make_engine, monkeypatch) -> None:
    engine = make_engine(slots=2)
    sink = RecordingSink(engine)
    engine.admit(1, validate_request(SHORT))
    for _ in range(3):
        engine.step(sink)
    real_decode = module.lc.llama_decode
    calls = {"n": 0}

    def aborted_once(context: Any, batch: Any) -> int:
        calls["n"] += 1
        return 2 if calls["n"] == 1 else int(real_decode(context, batch))

    monkeypatch.setattr(module.lc, "llama_decode", aborted_once)
    engine.step(sink)
    assert sink.ends()[1] == ("error", (500, "DecodeFailed", "llama_decode returned 2"))
    after = run(engine, {2: SHORT})
    assert after.ends()[2][0] == "done"
