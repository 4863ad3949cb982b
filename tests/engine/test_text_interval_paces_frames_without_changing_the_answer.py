"""``text_interval_ms``: a request whose client reads the whole answer at the end has
its text sent in a few frames, not one per token. The first piece and the end go at
once; the text, the token ids and the log-probabilities are those of an unpaced run,
and a paced stream continues elsewhere like any other."""

from __future__ import annotations

import time

from conftest import RecordingSink, run

from paddler.protocol.codec import pack_token_ids
from paddler.protocol.requests import CONTINUATION, validate_request

REQUEST = {"raw_prompt": "Once upon a time", "max_tokens": 40, "logprobs": True}


def _of(sink: RecordingSink, kind: str) -> list:
    return [value for _, k, _, value in sink.events if k == kind]


def test_a_paced_answer_is_the_same_in_two_frames(make_engine) -> None:
    engine = make_engine()
    plain = run(engine, {1: REQUEST})
    paced = run(engine, {2: {**REQUEST, "text_interval_ms": 10_000}})
    assert paced.text()[2] == plain.text()[1]
    assert len(plain.frames[1]) > 10
    # the first piece at once, then everything else at the end
    assert len(paced.frames[2]) == 2
    ids = [token for _, frame_ids in paced.frames[2] for token in frame_ids]
    assert ids == [token for _, frame_ids in plain.frames[1] for token in frame_ids]
    entries = [e for batch in _of(paced, "logprobs") for e in batch]
    assert entries == [e for batch in _of(plain, "logprobs") for e in batch]
    assert paced.ends()[2][1]["content_tokens"] == plain.ends()[1][1]["content_tokens"]


def test_a_short_interval_sends_a_few_frames(make_engine) -> None:
    engine = make_engine()
    plain = run(engine, {1: {**REQUEST, "max_tokens": 200}})
    paced = run(engine, {2: {**REQUEST, "max_tokens": 200, "text_interval_ms": 1}})
    assert paced.text()[2] == plain.text()[1]
    assert 2 <= len(paced.frames[2]) <= len(plain.frames[1])


def test_a_paced_stream_continues_elsewhere(make_engine) -> None:
    engine, other = make_engine(), make_engine()
    paced = run(engine, {1: {**REQUEST, "text_interval_ms": 10_000}})
    first_text, first_ids = paced.frames[1][0]
    request = validate_request({**REQUEST, "text_interval_ms": 10_000})
    request[CONTINUATION] = {"token_ids": pack_token_ids(first_ids)}
    sink = RecordingSink(other)
    other.admit(5, request)
    while other.active_count():
        other.step(sink)
    assert first_text + sink.text()[5] == paced.text()[1]


def test_paced_requests_flush_in_the_same_steps(make_engine) -> None:
    """Two paced requests started half an interval apart send their text in the
    same steps (a grid of the interval, not an interval after each one's last
    frame): one wakeup per interval for the agent, the balancer and the HTTP
    workers, whatever the number of paced slots."""
    engine = make_engine()
    request = {**REQUEST, "max_tokens": 400, "logprobs": False, "text_interval_ms": 4}
    sink = RecordingSink(engine)
    engine.admit(1, validate_request(request))
    engine.step(sink)
    started = time.monotonic()
    while time.monotonic() - started < 0.002:  # half an interval out of phase
        engine.step(sink)
    engine.admit(2, validate_request(request))
    while engine.active_count():
        engine.step(sink)
    steps = {
        wanted: [step for step, kind, rid, _ in sink.events if kind == "tokens" and rid == wanted]
        for wanted in (1, 2)
    }
    end_of_first = max(step for step, kind, rid, _ in sink.events if kind == "done" and rid == 1)
    # request 2's frames while request 1 runs: its first piece (at once), then on the grid
    middle = [step for step in steps[2][1:] if step < end_of_first]
    assert len(middle) >= 3, (steps, end_of_first)
    # all of them, but one: request 2's first grid point may be one request 1 missed
    # (a step more than half an interval late makes a slot skip a grid point)
    apart = [step for step in middle if step not in set(steps[1])]
    assert len(apart) <= 1, (middle, steps[1])
