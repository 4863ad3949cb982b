"""``paddler.http.sse``: the one server-sent events writer, checked against the
event-stream format (every line of a value its own ``data:`` field) and against
the agents and buffered-requests streams of the management app."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import falcon
import falcon.asgi
import falcon.testing
import pytest

from paddler.http import management, sse
from paddler.http.asgi import DISCONNECTED
from paddler.http.common import HttpDeps
from tests.unit.fake_broker import AGENT, FakeClient, FakeLink


def parse(stream: bytes) -> tuple[list[str], list[str]]:
    """A small event-stream parser after the WHATWG rules: the data of every event
    and every comment, in order."""
    events: list[str] = []
    comments: list[str] = []
    data: list[str] | None = None
    text = stream.decode()
    assert text.endswith("\n\n") or not text
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if data is not None:
                events.append("\n".join(data))
            data = None
        elif line.startswith(":"):
            comments.append(line[1:].removeprefix(" "))
        else:
            name, _, value = line.partition(":")
            assert name == "data", line
            data = [*(data or []), value.removeprefix(" ")]
    return events, comments


def test_a_json_value_is_one_compact_data_line() -> None:
    assert sse.event({"a": [1, 2], "b": "é"}) == 'data: {"a":[1,2],"b":"é"}\n\n'.encode()


def test_a_string_is_sent_as_it_is() -> None:
    assert sse.event("[DONE]") == b"data: [DONE]\n\n"
    assert sse.DONE == b"data: [DONE]\n\n"
    assert sse.event('{"already":"json"}') == b'data: {"already":"json"}\n\n'
    assert sse.event(b"raw bytes") == b"data: raw bytes\n\n"


@pytest.mark.parametrize(
    "value",
    ["one\ntwo", "one\r\ntwo\rthree", "trailing\n", "\nleading", "", "a\n\nb", b"x\ny"],
)
def test_every_line_of_a_value_is_its_own_data_field(value: str | bytes) -> None:
    framed = sse.event(value)
    text = value.decode() if isinstance(value, bytes) else value
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    assert parse(framed) == ([expected], [])
    assert framed.count(b"\n\n") == 1 and framed.endswith(b"\n\n")  # no early end of event
    assert all(line.startswith(b"data: ") for line in framed[:-2].split(b"\n"))


def test_json_with_line_separators_stays_on_one_line() -> None:
    value = {"text": "a\nb\u2028c\u2029d\x85e"}
    framed = sse.event(value)
    assert framed.count(b"\n") == 2
    [data], _ = parse(framed)
    assert json.loads(data) == value


def test_comments_for_keep_alives() -> None:
    assert sse.comment("keep-alive") == b": keep-alive\n\n"
    assert sse.KEEP_ALIVE == b": keep-alive\n\n"
    assert parse(sse.comment("two\nlines")) == ([], ["two", "lines"])
    assert parse(sse.comment() + sse.event("x")) == (["x"], [""])


def test_headers_of_an_event_stream() -> None:
    resp = falcon.asgi.Response()
    sse.set_headers(resp)
    assert resp.content_type == "text/event-stream"
    assert resp.get_header("Cache-Control") == "no-cache"
    assert resp.get_header("X-Accel-Buffering") == "no"


# ----------------------------------------------------------- management streams


def _stream(fake: FakeClient, path: str, events: int, **changes: Any) -> falcon.testing.Result:
    """GET a management stream until ``events`` events came (the fake broker changes
    its agents in between), then disconnect."""
    gone = asyncio.Event()
    app = management.create_app(HttpDeps(link=FakeLink(fake)))  # type: ignore[arg-type]
    seen: list[bytes] = []

    async def run() -> falcon.testing.Result:
        async with (
            falcon.testing.ASGIConductor(app) as conductor,
            conductor.simulate_get_stream(path, extras={DISCONNECTED: gone}) as sr,
        ):
            while len(parse(b"".join(seen))[0]) < events:
                chunk = await asyncio.wait_for(sr.stream.read(), 5)
                seen.append(chunk)
                for key, value in changes.items():
                    setattr(fake, key, value)
            gone.set()
            return sr  # type: ignore[no-any-return]

    result = asyncio.run(run())
    result.body = b"".join(seen)  # type: ignore[attr-defined]
    return result


def test_the_agents_stream_sends_paddler_snapshots_as_events() -> None:
    fake = FakeClient()
    busy = {**AGENT, "slots_processing": 3}
    result = _stream(fake, "/api/v1/agents/stream", 2, agent_list=[busy])
    assert result.headers["content-type"] == "text/event-stream"
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-accel-buffering"] == "no"
    events, _ = parse(result.body)  # type: ignore[attr-defined]
    paddler = {k: v for k, v in AGENT.items() if k != "ready"}
    assert [json.loads(e) for e in events[:2]] == [
        {"agents": [paddler]},
        {"agents": [{**paddler, "slots_processing": 3}]},
    ]


def test_the_buffered_stream_sends_the_count_then_keeps_alive(monkeypatch) -> None:
    monkeypatch.setattr(management, "SSE_KEEPALIVE_S", 0.2)
    gone = asyncio.Event()
    app = management.create_app(HttpDeps(link=FakeLink(FakeClient())))  # type: ignore[arg-type]

    async def run() -> bytes:
        body = b""
        async with (
            falcon.testing.ASGIConductor(app) as conductor,
            conductor.simulate_get_stream(
                "/api/v1/buffered_requests/stream", extras={DISCONNECTED: gone}
            ) as sr,
        ):
            while b"keep-alive" not in body:
                body += await asyncio.wait_for(sr.stream.read(), 5)
            gone.set()
        return body

    events, comments = parse(asyncio.run(run()))
    assert [json.loads(e) for e in events] == [{"buffered_requests_current": 2}]
    assert comments == ["keep-alive"]
