"""The agent's sink gathers a step's frames and sends them as one message when the
engine flushes; the engine flushes before each decode, so no text (the first
token's above all) waits a decode step longer than it did when every frame went
out at once."""

from __future__ import annotations

from conftest import RecordingSink

from paddler.protocol.requests import validate_request


def test_every_event_is_flushed_before_the_decode_after_it(make_engine) -> None:
    engine = make_engine(slots=4)
    sink = RecordingSink(engine)
    for request_id in range(1, 7):  # more than the slots: some wait and start later
        engine.admit(
            request_id,
            validate_request({"raw_prompt": f"Story {request_id}:", "max_tokens": 12 + request_id}),
        )
    while engine.active_count():
        engine.step(sink)
    assert len(sink.ends()) == 6
    assert sum(kind == "tokens" for _, kind, _, _ in sink.events) > 20
    for index, (decoded, kind, request_id, _) in enumerate(sink.events):
        # the first flush that covers this event came before any further decode
        flushed_at = next(steps for steps, count in sink.flushes if count > index)
        assert flushed_at == decoded, (kind, request_id, decoded, flushed_at)
