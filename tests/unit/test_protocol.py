"""The wire protocol: frame codec, message records and request validation.

Untrusted input must only ever produce ``ProtocolError`` (frames and records)
or ``InvalidRequest`` (generation requests), naming what is wrong.
"""

from __future__ import annotations

import copy
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paddler.errors import InvalidRequest, PaddlerError, ProtocolError
from paddler.protocol import (
    HEADER_SIZE,
    MAX_BODY_BYTES,
    Kind,
    decode,
    encode,
    make_header,
    pack_body,
    parse_header,
    split_frames,
    unpack_body,
)
from paddler.protocol.kinds import KNOWN_KINDS
from paddler.protocol.messages import (
    USAGE_FIELDS,
    AgentStatus,
    ErrorBody,
    Record,
    Register,
    Registered,
    Usage,
    token_pieces,
)
from paddler.protocol.requests import (
    DEFAULT_MAX_TOKENS,
    MAX_LOGIT_BIAS,
    MAX_PROMPT_CHARS,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_TOKENS_LIMIT,
    validate_request,
)

MAX_REQUEST_ID = 2**64 - 1
UNKNOWN_KINDS = sorted(set(range(256)) - KNOWN_KINDS)

# Values msgpack carries unchanged (lists, not tuples; str keys only).
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=16),
    st.binary(max_size=16),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=16,
)
# Decoded-JSON-like values, the shape of what a peer could send in a field.
JSONISH = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64),
        st.floats(),
        st.text(max_size=12),
        st.binary(max_size=4),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.text(max_size=8), children, max_size=3),
    ),
    max_leaves=8,
)


def raises_protocol_error_or_returns(call: Any, *args: Any) -> Any:
    """``call(*args)``, or ``None`` if it raised ``ProtocolError``; any other exception fails."""
    try:
        return call(*args)
    except ProtocolError:
        return None


# --------------------------------------------------------------------------------------
# Codec: round trips
# --------------------------------------------------------------------------------------

ROUND_TRIP_BODIES = [
    None,
    {},
    [],
    {"slots_total": 4, "ready": True, "model_path": None, "issues": []},
    ["piece", "", "ünïcødé ✓"],
    {"nested": {"list": [1, -1, 2**64 - 1, -(2**63), 1.5, b"\x00\xff", True, None]}},
    "text",
    b"bytes",
    0,
    -(2**63),
    2**64 - 1,
    math.inf,
]


@pytest.mark.parametrize("kind", list(Kind), ids=lambda kind: kind.name)
def test_every_kind_round_trips(kind: Kind) -> None:
    for request_id in (0, 1, 2**32, MAX_REQUEST_ID):
        for body in ROUND_TRIP_BODIES:
            frames = encode(kind, request_id, body)
            assert len(frames) == 2
            header, packed = frames
            assert isinstance(header, bytes)
            assert isinstance(packed, bytes)
            assert len(header) == HEADER_SIZE == 9
            assert header == make_header(kind, request_id)
            assert header[0] == int(kind)
            assert int.from_bytes(header[1:], "big") == request_id
            assert packed == pack_body(body)
            assert parse_header(header) == (kind, request_id)
            assert split_frames(frames) == (kind, request_id, packed)
            assert split_frames(tuple(frames)) == (kind, request_id, packed)
            assert unpack_body(packed) == body
            decoded_kind, decoded_id, decoded_body = decode(frames)
            assert decoded_kind == kind
            assert Kind(decoded_kind) is kind
            assert decoded_id == request_id
            assert decoded_body == body
            assert type(decoded_body) is type(body)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(Kind), request_id=st.integers(0, MAX_REQUEST_ID), body=VALUES)
def test_round_trip_property(kind: Kind, request_id: int, body: Any) -> None:
    assert decode(encode(kind, request_id, body)) == (kind, request_id, body)


def test_make_header_defaults_to_request_id_zero() -> None:
    assert make_header(Kind.PING) == bytes([Kind.PING]) + bytes(8)


def test_kinds_are_distinct_bytes() -> None:
    values = [int(kind) for kind in Kind]
    assert len(values) == len(set(values))
    assert all(0 <= v <= 255 for v in values)
    assert frozenset(values) == KNOWN_KINDS


def test_body_at_the_size_limit_is_accepted() -> None:
    payload = b"x" * (MAX_BODY_BYTES - 5)  # bin 32: 5 bytes of header
    packed = pack_body(payload)
    assert len(packed) == MAX_BODY_BYTES
    assert decode([make_header(Kind.TOKENS, 7), packed]) == (Kind.TOKENS, 7, payload)


# --------------------------------------------------------------------------------------
# Codec: malformed input
# --------------------------------------------------------------------------------------


def test_protocol_error_is_a_paddler_error() -> None:
    assert issubclass(ProtocolError, PaddlerError)


@pytest.mark.parametrize("length", [0, 1, 8, 10, 18, 100])
def test_header_of_wrong_length(length: int) -> None:
    frame = bytes([Kind.PING]) + b"\x00" * (length - 1) if length else b""
    with pytest.raises(ProtocolError, match="header"):
        parse_header(frame)
    with pytest.raises(ProtocolError):
        decode([frame, pack_body(None)])


def test_every_byte_value_as_kind() -> None:
    for value in range(256):
        frame = struct.pack(">BQ", value, 12345)
        if value in KNOWN_KINDS:
            assert parse_header(frame) == (value, 12345)
        else:
            with pytest.raises(ProtocolError, match=f"unknown message kind {value}"):
                parse_header(frame)
            with pytest.raises(ProtocolError):
                decode([frame, pack_body({})])
    assert 0 in UNKNOWN_KINDS
    assert 255 in UNKNOWN_KINDS


@pytest.mark.parametrize("count", [0, 1, 3, 4])
def test_wrong_number_of_frames(count: int) -> None:
    frames = [make_header(Kind.PING, 1), pack_body(None), b"", b"extra"][:count]
    with pytest.raises(ProtocolError, match="2 frames"):
        split_frames(frames)
    with pytest.raises(ProtocolError):
        decode(frames)


BAD_BODIES = {
    "empty": b"",
    "never-used byte": b"\xc1",
    "truncated map": pack_body({"a": 1})[:-1],
    "truncated str": pack_body("hello")[:3],
    "truncated bin": pack_body(b"\x00" * 300)[:100],
    "extra data": pack_body({"a": 1}) + b"\x00",
    "two values": pack_body(1) + pack_body(2),
    "invalid utf-8": b"\xa2\xff\xfe",
    "int map key": msgpack.packb({1: 2}),
    "nil map key": msgpack.packb({None: 1}),
    "array longer than body": b"\xdd\xff\xff\xff\xff",
    "map longer than body": b"\xdf\xff\xff\xff\xff",
    "str longer than body": b"\xdb\xff\xff\xff\xff",
    "too deep": b"\x91" * 100_000 + b"\xc0",
    "bad timestamp ext": b"\xd4\xff\x00",
}


@pytest.mark.parametrize("body", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_malformed_body(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack_body(body)
    with pytest.raises(ProtocolError):
        decode([make_header(Kind.SUBMIT, 3), body])


def test_every_truncation_of_a_body_is_refused() -> None:
    packed = pack_body({"raw_prompt": "hello", "max_tokens": 300, "stop": ["\n", "</s>"]})
    for end in range(len(packed)):
        with pytest.raises(ProtocolError):
            decode([make_header(Kind.SUBMIT, 1), packed[:end]])


@pytest.mark.parametrize(
    "body",
    [b"\x00" * (MAX_BODY_BYTES + 1), pack_body(b"x" * MAX_BODY_BYTES)],
    ids=["garbage", "valid msgpack"],
)
def test_oversized_body(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        unpack_body(body)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode([make_header(Kind.TOKENS, 1), body])


@st.composite
def truncated_or_padded(draw: st.DrawFn) -> bytes:
    packed = pack_body(draw(VALUES))
    if draw(st.booleans()):
        return packed[: draw(st.integers(0, len(packed)))]
    return packed + draw(st.binary(min_size=1, max_size=8))


HEADER_FRAMES = st.one_of(
    st.binary(max_size=12),
    st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE),
    st.builds(make_header, st.sampled_from(sorted(KNOWN_KINDS)), st.integers(0, MAX_REQUEST_ID)),
)
BODY_FRAMES = st.one_of(
    st.binary(max_size=64),
    VALUES.map(pack_body),
    truncated_or_padded(),
)
ANY_FRAMES = st.one_of(
    st.tuples(HEADER_FRAMES, BODY_FRAMES).map(list),
    st.lists(st.one_of(HEADER_FRAMES, BODY_FRAMES), max_size=5),
)


@settings(max_examples=400, deadline=None)
@given(frames=ANY_FRAMES)
def test_decode_of_anything_raises_only_protocol_error(frames: list[bytes]) -> None:
    result = raises_protocol_error_or_returns(decode, frames)
    if result is not None:
        kind, request_id, _ = result
        assert len(frames) == 2
        assert kind in KNOWN_KINDS
        assert kind == frames[0][0]
        assert request_id == int.from_bytes(frames[0][1:], "big")
        assert split_frames(frames) == (kind, request_id, frames[1])


@settings(max_examples=200, deadline=None)
@given(frame=st.one_of(st.binary(max_size=80), BODY_FRAMES))
def test_header_and_body_parsers_raise_only_protocol_error(frame: bytes) -> None:
    raises_protocol_error_or_returns(parse_header, frame)
    raises_protocol_error_or_returns(unpack_body, frame)


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------

NOT_MAPS = [None, [], ["slots_total", 1], "body", b"body", 1, 1.5, True]


def assert_names(exc_info: pytest.ExceptionInfo[ProtocolError], *words: str) -> None:
    message = str(exc_info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("record", [AgentStatus, Register, Registered, ErrorBody, Usage])
@pytest.mark.parametrize("body", NOT_MAPS, ids=repr)
def test_record_body_must_be_a_map(record: type[Record], body: Any) -> None:
    with pytest.raises(ProtocolError) as exc_info:
        record.from_body(body)
    assert_names(exc_info, record.__name__, "map")


def test_agent_status_defaults_and_round_trip() -> None:
    status = AgentStatus.from_body({"slots_total": 4})
    assert status == AgentStatus(slots_total=4)
    assert status.ready is False
    assert status.desired_slots_total == 0
    assert status.model_path is None
    assert status.issues == []
    assert status.state_application_status == "Fresh"
    assert status.uses_chat_template_override is False
    assert status.download_current == status.download_total == 0
    assert status.download_filename is None
    full = AgentStatus(
        slots_total=4096,
        ready=True,
        desired_slots_total=8,
        model_path="/models/m.gguf",
        issues=[{"kind": "ModelCannotBeLoaded"}],
        state_application_status="Applied",
        uses_chat_template_override=True,
        download_current=10,
        download_total=20,
        download_filename="m.gguf",
    )
    body = full.to_body()
    assert set(body) == set(AgentStatus.SPEC)
    assert AgentStatus.from_body(body) == full
    assert AgentStatus.from_body(unpack_body(pack_body(body))) == full
    assert AgentStatus.from_body({**body, "from_a_newer_peer": [1, 2]}) == full
    assert AgentStatus.from_body({"slots_total": 0}).slots_total == 0


AGENT_STATUS_BAD_FIELDS = [
    ("slots_total", True),
    ("slots_total", False),
    ("slots_total", "4"),
    ("slots_total", 4.0),
    ("slots_total", None),
    ("ready", 1),
    ("ready", 0),
    ("ready", None),
    ("ready", "true"),
    ("desired_slots_total", True),
    ("desired_slots_total", 2.0),
    ("model_path", 3),
    ("model_path", b"/models/m.gguf"),
    ("issues", {}),
    ("issues", "none"),
    ("issues", None),
    ("state_application_status", None),
    ("state_application_status", 1),
    ("uses_chat_template_override", 1),
    ("uses_chat_template_override", None),
    ("download_current", 1.5),
    ("download_current", False),
    ("download_total", True),
    ("download_total", "20"),
    ("download_filename", b"m.gguf"),
    ("download_filename", 0),
]


@pytest.mark.parametrize(("name", "value"), AGENT_STATUS_BAD_FIELDS, ids=repr)
def test_agent_status_wrong_types(name: str, value: Any) -> None:
    body = {"slots_total": 2, name: value}
    with pytest.raises(ProtocolError) as exc_info:
        AgentStatus.from_body(body)
    assert_names(exc_info, f"AgentStatus.{name}")


@pytest.mark.parametrize("slots_total", [-1, 4097, 2**64, -(2**63)])
def test_agent_status_slots_out_of_range(slots_total: int) -> None:
    with pytest.raises(ProtocolError) as exc_info:
        AgentStatus.from_body({"slots_total": slots_total})
    assert_names(exc_info, "AgentStatus.slots_total")


def test_agent_status_requires_slots_total() -> None:
    with pytest.raises(ProtocolError) as exc_info:
        AgentStatus.from_body({"ready": True})
    assert_names(exc_info, "AgentStatus", "missing", "slots_total")


REGISTER_BODY = {"version": 1, "name": "agent-1", "status": {"slots_total": 2}}


def test_register_round_trip() -> None:
    register = Register.from_body(REGISTER_BODY)
    assert register == Register(version=1, name="agent-1", status={"slots_total": 2})
    assert register.to_body() == REGISTER_BODY
    assert Register.from_body({**REGISTER_BODY, "name": None}).name is None


@pytest.mark.parametrize("name", list(REGISTER_BODY))
def test_register_missing_field(name: str) -> None:
    body = {k: v for k, v in REGISTER_BODY.items() if k != name}
    with pytest.raises(ProtocolError) as exc_info:
        Register.from_body(body)
    assert_names(exc_info, "Register", "missing", name)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("version", True),
        ("version", "1"),
        ("version", 1.0),
        ("version", None),
        ("name", 5),
        ("name", b"agent"),
        ("status", []),
        ("status", None),
        ("status", "ready"),
    ],
    ids=repr,
)
def test_register_wrong_types(name: str, value: Any) -> None:
    with pytest.raises(ProtocolError) as exc_info:
        Register.from_body({**REGISTER_BODY, name: value})
    assert_names(exc_info, f"Register.{name}")


def test_registered_round_trip_and_errors() -> None:
    registered = Registered(agent_id="a1", heartbeat_interval_ms=500)
    assert Registered.from_body(registered.to_body()) == registered
    with pytest.raises(ProtocolError) as exc_info:
        Registered.from_body({"agent_id": "a1", "heartbeat_interval_ms": False})
    assert_names(exc_info, "Registered.heartbeat_interval_ms")
    with pytest.raises(ProtocolError) as exc_info:
        Registered.from_body({"heartbeat_interval_ms": 500})
    assert_names(exc_info, "agent_id")


ERROR_BODY = {"code": 503, "kind": "BufferOverflow", "description": "the buffer is full"}


def test_error_body_round_trip() -> None:
    error = ErrorBody.from_body(ERROR_BODY)
    assert error == ErrorBody(503, "BufferOverflow", "the buffer is full")
    assert error.to_body() == ERROR_BODY


@pytest.mark.parametrize("name", list(ERROR_BODY))
def test_error_body_missing_field(name: str) -> None:
    body = {k: v for k, v in ERROR_BODY.items() if k != name}
    with pytest.raises(ProtocolError) as exc_info:
        ErrorBody.from_body(body)
    assert_names(exc_info, "ErrorBody", "missing", name)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("code", True),
        ("code", "503"),
        ("code", 503.0),
        ("code", None),
        ("kind", 1),
        ("kind", None),
        ("kind", b"BufferOverflow"),
        ("description", []),
        ("description", None),
    ],
    ids=repr,
)
def test_error_body_wrong_types(name: str, value: Any) -> None:
    with pytest.raises(ProtocolError) as exc_info:
        ErrorBody.from_body({**ERROR_BODY, name: value})
    assert_names(exc_info, f"ErrorBody.{name}")


def test_usage_defaults_and_round_trip() -> None:
    assert Usage.from_body({}) == Usage()
    assert all(value == 0 for value in Usage().to_body().values())
    usage = Usage(**{name: index + 1 for index, name in enumerate(USAGE_FIELDS)})
    assert list(usage.to_body()) == list(USAGE_FIELDS)
    assert Usage.from_body(usage.to_body()) == usage
    assert Usage.from_body({"prompt_tokens": 5, "other": "ignored"}) == Usage(prompt_tokens=5)


@pytest.mark.parametrize("name", USAGE_FIELDS)
@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, [1]], ids=repr)
def test_usage_wrong_types(name: str, value: Any) -> None:
    with pytest.raises(ProtocolError) as exc_info:
        Usage.from_body({name: value})
    assert_names(exc_info, f"Usage.{name}")


RECORD_FIELDS = {
    record: sorted(record.SPEC) for record in (AgentStatus, Register, Registered, ErrorBody, Usage)
}


@settings(max_examples=300, deadline=None)
@given(data=st.data(), record=st.sampled_from(sorted(RECORD_FIELDS, key=lambda r: r.__name__)))
def test_record_from_anything_raises_only_protocol_error(
    data: st.DataObject, record: type[Record]
) -> None:
    keys = st.one_of(st.sampled_from(RECORD_FIELDS[record]), st.text(max_size=6))
    body = data.draw(st.one_of(JSONISH, st.dictionaries(keys, JSONISH, max_size=12)))
    result = raises_protocol_error_or_returns(record.from_body, body)
    if result is not None:
        assert isinstance(result, record)
        for name, types in record.SPEC.items():
            value = getattr(result, name)
            assert isinstance(value, types)
            assert bool in types or not isinstance(value, bool)


def test_token_pieces() -> None:
    assert token_pieces([]) == []
    assert token_pieces(["a", "", "ß"]) == ["a", "", "ß"]
    for body in (None, "abc", ["a", 1], ["a", None], [b"a"], {"pieces": ["a"]}):
        with pytest.raises(ProtocolError, match="Tokens"):
            token_pieces(body)


# --------------------------------------------------------------------------------------
# Generation requests
# --------------------------------------------------------------------------------------

DEFAULTS = {
    "max_tokens": DEFAULT_MAX_TOKENS,
    "grammar": None,
    "add_generation_prompt": True,
    "enable_thinking": False,
    "reasoning_budget": None,
    "tools": [],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "parse_tool_calls": False,
    "temperature": None,
    "top_p": None,
    "top_k": None,
    "min_p": None,
    "seed": None,
    "stop": [],
    "frequency_penalty": None,
    "presence_penalty": None,
    "logit_bias": None,
    "text_interval_ms": 0,
    "count_only": False,
    "logprobs": False,
    "top_logprobs": 0,
}
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "x": 1}]},
    {"role": "assistant", "content": ""},
]


def test_raw_request_gets_the_defaults() -> None:
    assert validate_request({"raw_prompt": "Once upon"}) == {"raw_prompt": "Once upon", **DEFAULTS}
    assert validate_request({"raw_prompt": ""})["raw_prompt"] == ""
    assert validate_request({"raw_prompt": "x" * MAX_PROMPT_CHARS})["max_tokens"] == 1000


def test_conversation_request_gets_the_defaults() -> None:
    request = {"conversation_history": CONVERSATION}
    assert validate_request(request) == {"conversation_history": CONVERSATION, **DEFAULTS}


def test_every_field_at_its_bounds() -> None:
    for request in (
        {
            "raw_prompt": "p",
            "max_tokens": 1,
            "grammar": {"type": "gbnf", "grammar": 'root ::= "a"'},
            "add_generation_prompt": False,
            "enable_thinking": True,
            "text_interval_ms": 10_000,
            "tools": [
                {"type": "function", "function": {"name": f"t{i}", "parameters": {}}}
                for i in range(128)
            ],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "parse_tool_calls": True,
            "temperature": 0,
            "frequency_penalty": -2,
            "presence_penalty": 2,
            "logit_bias": {str(i): -100 for i in range(MAX_LOGIT_BIAS)},
            "logprobs": True,
            "top_logprobs": 20,
            "top_p": 0,
            "top_k": 0,
            "min_p": 0.0,
            "seed": 0,
            "stop": ["x" * MAX_STOP_LENGTH] * MAX_STOP_STRINGS,
        },
        {
            "conversation_history": CONVERSATION,
            "max_tokens": MAX_TOKENS_LIMIT,
            "grammar": {"type": "gbnf", "grammar": "start ::= [a-z]+", "root": "start"},
            "temperature": 100.0,
            "top_p": 1,
            "top_k": 1_000_000,
            "min_p": 1.0,
            "seed": 2**32 - 1,
            "stop": [],
        },
        {"raw_prompt": "p", "grammar": {"type": "json_schema", "schema": '{"type":"object"}'}},
        {"raw_prompt": "p", "enable_thinking": True, "reasoning_budget": 0},
        {
            "raw_prompt": "p",
            "tools": [{"type": "function", "function": {"name": "f.n-1_"}}],
            "tool_choice": {"type": "function", "function": {"name": "f.n-1_"}},
        },
        {
            "raw_prompt": "p",
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },
        {"raw_prompt": "p", "temperature": 0.7, "top_p": 0.95, "min_p": 0.05, "grammar": None},
    ):
        assert validate_request(request) == {**DEFAULTS, **request}


def test_a_single_stop_string_becomes_a_list() -> None:
    request = {"raw_prompt": "p", "stop": "\n\n"}
    assert validate_request(request)["stop"] == ["\n\n"]
    assert request["stop"] == "\n\n"  # the request itself is left alone


def test_the_request_is_not_modified() -> None:
    request = {"conversation_history": CONVERSATION, "stop": "x", "max_tokens": 5}
    before = copy.deepcopy(request)
    normalized = validate_request(request)
    assert request == before
    assert normalized is not request


def test_normalized_requests_do_not_share_default_lists() -> None:
    first = validate_request({"raw_prompt": "a"})
    second = validate_request({"raw_prompt": "b"})
    assert first["tools"] is not second["tools"]
    assert first["stop"] is not second["stop"]


INVALID_REQUESTS = [
    # (request, field named by the error)
    (None, "request"),
    ([], "request"),
    ("raw_prompt", "request"),
    ({"raw_prompt": "p", "bogus": 1}, "bogus"),
    ({"raw_prompt": "p", "maxTokens": 10}, "maxTokens"),
    ({}, "raw_prompt"),
    ({"max_tokens": 10}, "raw_prompt"),
    ({"raw_prompt": "p", "conversation_history": CONVERSATION}, "raw_prompt"),
    ({"raw_prompt": None}, "raw_prompt"),
    ({"raw_prompt": 5}, "raw_prompt"),
    ({"raw_prompt": b"p"}, "raw_prompt"),
    ({"raw_prompt": ["p"]}, "raw_prompt"),
    ({"raw_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "raw_prompt"),
    ({"conversation_history": []}, "conversation_history"),
    ({"conversation_history": None}, "conversation_history"),
    ({"conversation_history": "hi"}, "conversation_history"),
    ({"conversation_history": {"role": "user", "content": "hi"}}, "conversation_history"),
    ({"conversation_history": ["hi"]}, "conversation_history[0]"),
    ({"conversation_history": [*CONVERSATION, None]}, "conversation_history[3]"),
    ({"conversation_history": [{"content": "hi"}]}, "conversation_history[0].role"),
    ({"conversation_history": [{"role": "", "content": "hi"}]}, "conversation_history[0].role"),
    ({"conversation_history": [{"role": 1, "content": "hi"}]}, "conversation_history[0].role"),
    ({"conversation_history": [{"role": None, "content": "hi"}]}, "conversation_history[0].role"),
    ({"conversation_history": [{"role": "user"}]}, "conversation_history[0].content"),
    (
        {"conversation_history": [{"role": "user", "content": None}]},
        "conversation_history[0].content",
    ),
    ({"conversation_history": [{"role": "user", "content": 5}]}, "conversation_history[0].content"),
    (
        {"conversation_history": [{"role": "user", "content": {"type": "text"}}]},
        "conversation_history[0].content",
    ),
    (
        {"conversation_history": [{"role": "user", "content": ["hi"]}]},
        "conversation_history[0].content[0]",
    ),
    (
        {"conversation_history": [{"role": "user", "content": [{"text": "hi"}]}]},
        "conversation_history[0].content[0]",
    ),
    (
        {"conversation_history": [{"role": "user", "content": [{"type": 1}]}]},
        "conversation_history[0].content[0]",
    ),
    (
        {
            "conversation_history": [
                CONVERSATION[0],
                {"role": "user", "content": [{"type": "t"}, 3]},
            ]
        },
        "conversation_history[1].content[1]",
    ),
    ({"raw_prompt": "p", "max_tokens": 0}, "max_tokens"),
    ({"raw_prompt": "p", "max_tokens": -1}, "max_tokens"),
    ({"raw_prompt": "p", "max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
    ({"raw_prompt": "p", "max_tokens": 2**70}, "max_tokens"),
    ({"raw_prompt": "p", "max_tokens": True}, "max_tokens"),
    ({"raw_prompt": "p", "max_tokens": False}, "max_tokens"),
    ({"raw_prompt": "p", "max_tokens": 10.0}, "max_tokens"),
    ({"raw_prompt": "p", "max_tokens": 10.5}, "max_tokens"),
    ({"raw_prompt": "p", "max_tokens": "10"}, "max_tokens"),
    ({"raw_prompt": "p", "max_tokens": None}, "max_tokens"),
    ({"raw_prompt": "p", "add_generation_prompt": 1}, "add_generation_prompt"),
    ({"raw_prompt": "p", "add_generation_prompt": None}, "add_generation_prompt"),
    ({"raw_prompt": "p", "enable_thinking": "true"}, "enable_thinking"),
    ({"raw_prompt": "p", "parse_tool_calls": 0}, "parse_tool_calls"),
    ({"raw_prompt": "p", "tools": [{"type": "function"}]}, "tools[0].function"),
    ({"raw_prompt": "p", "tools": [{"function": {"name": "a"}}]}, "tools[0].type"),
    (
        {"raw_prompt": "p", "tools": [{"type": "function", "function": {"name": "a b"}}]},
        "tools[0].function.name",
    ),
    ({"raw_prompt": "p", "tool_choice": "required"}, "tool_choice"),
    ({"raw_prompt": "p", "tool_choice": "always"}, "tool_choice"),
    ({"raw_prompt": "p", "parallel_tool_calls": 1}, "parallel_tool_calls"),
    # false is kept to only by a forced choice's grammar
    (
        {
            "raw_prompt": "p",
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "parallel_tool_calls": False,
        },
        "parallel_tool_calls",
    ),
    (
        {
            "conversation_history": CONVERSATION,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "auto",
            "parallel_tool_calls": False,
        },
        "parallel_tool_calls",
    ),
    # the agents serve text-only models: media parts never reach them
    (
        {
            "conversation_history": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                    ],
                }
            ]
        },
        "conversation_history[0].content[1]",
    ),
    (
        {
            "conversation_history": [
                CONVERSATION[0],
                {"role": "user", "content": [{"type": "image"}]},
            ]
        },
        "conversation_history[1].content[0]",
    ),
    (
        {"conversation_history": [{"role": "user", "content": [{"type": "input_audio"}]}]},
        "conversation_history[0].content[0]",
    ),
    ({"raw_prompt": "p", "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"raw_prompt": "p", "presence_penalty": "1"}, "presence_penalty"),
    ({"raw_prompt": "p", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"raw_prompt": "p", "logit_bias": {"1": 101}}, "logit_bias"),
    ({"raw_prompt": "p", "logit_bias": {"-1": 1}}, "logit_bias"),
    (
        {"raw_prompt": "p", "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}},
        "logit_bias",
    ),
    ({"raw_prompt": "p", "logprobs": 1}, "logprobs"),
    ({"raw_prompt": "p", "top_logprobs": 21}, "top_logprobs"),
    ({"raw_prompt": "p", "tools": None}, "tools"),
    ({"raw_prompt": "p", "tools": {"type": "function"}}, "tools"),
    ({"raw_prompt": "p", "tools": "get_weather"}, "tools"),
    ({"raw_prompt": "p", "grammar": "root ::= x"}, "grammar"),
    ({"raw_prompt": "p", "grammar": []}, "grammar"),
    ({"raw_prompt": "p", "grammar": {}}, "grammar.type"),
    ({"raw_prompt": "p", "grammar": {"type": "regex", "grammar": "a+"}}, "grammar.type"),
    ({"raw_prompt": "p", "grammar": {"type": None}}, "grammar.type"),
    ({"raw_prompt": "p", "grammar": {"type": "gbnf"}}, "grammar.grammar"),
    ({"raw_prompt": "p", "grammar": {"type": "gbnf", "grammar": 5}}, "grammar.grammar"),
    (
        {"raw_prompt": "p", "grammar": {"type": "gbnf", "grammar": "root ::= x", "root": 1}},
        "grammar.root",
    ),
    (
        {"raw_prompt": "p", "grammar": {"type": "gbnf", "grammar": "root ::= x", "root": None}},
        "grammar.root",
    ),
    ({"raw_prompt": "p", "grammar": {"type": "json_schema"}}, "grammar.schema"),
    (
        {"raw_prompt": "p", "grammar": {"type": "json_schema", "schema": {"type": "object"}}},
        "grammar.schema",
    ),
    ({"raw_prompt": "p", "temperature": -0.01}, "temperature"),
    ({"raw_prompt": "p", "temperature": 100.01}, "temperature"),
    ({"raw_prompt": "p", "temperature": 101}, "temperature"),
    ({"raw_prompt": "p", "temperature": True}, "temperature"),
    ({"raw_prompt": "p", "temperature": "0.7"}, "temperature"),
    ({"raw_prompt": "p", "temperature": math.nan}, "temperature"),
    ({"raw_prompt": "p", "temperature": math.inf}, "temperature"),
    ({"raw_prompt": "p", "top_p": -0.1}, "top_p"),
    ({"raw_prompt": "p", "top_p": 1.01}, "top_p"),
    ({"raw_prompt": "p", "top_p": 2}, "top_p"),
    ({"raw_prompt": "p", "top_p": True}, "top_p"),
    ({"raw_prompt": "p", "top_p": "0.9"}, "top_p"),
    ({"raw_prompt": "p", "top_p": math.nan}, "top_p"),
    ({"raw_prompt": "p", "min_p": 1.5}, "min_p"),
    ({"raw_prompt": "p", "min_p": -1}, "min_p"),
    ({"raw_prompt": "p", "min_p": False}, "min_p"),
    ({"raw_prompt": "p", "top_k": -1}, "top_k"),
    ({"raw_prompt": "p", "top_k": 1_000_001}, "top_k"),
    ({"raw_prompt": "p", "top_k": 40.0}, "top_k"),
    ({"raw_prompt": "p", "top_k": True}, "top_k"),
    ({"raw_prompt": "p", "top_k": "40"}, "top_k"),
    ({"raw_prompt": "p", "seed": -1}, "seed"),
    ({"raw_prompt": "p", "seed": 2**32}, "seed"),
    ({"raw_prompt": "p", "seed": 1.0}, "seed"),
    ({"raw_prompt": "p", "seed": True}, "seed"),
    ({"raw_prompt": "p", "seed": "42"}, "seed"),
    ({"raw_prompt": "p", "stop": ""}, "stop"),
    ({"raw_prompt": "p", "stop": [""]}, "stop"),
    ({"raw_prompt": "p", "stop": ["ok", 5]}, "stop"),
    ({"raw_prompt": "p", "stop": [None]}, "stop"),
    ({"raw_prompt": "p", "stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"raw_prompt": "p", "stop": ["x" * (MAX_STOP_LENGTH + 1)]}, "stop"),
    ({"raw_prompt": "p", "stop": None}, "stop"),
    ({"raw_prompt": "p", "stop": 5}, "stop"),
    ({"raw_prompt": "p", "stop": {"s": 1}}, "stop"),
]


def _case_id(case: tuple[Any, str]) -> str:
    request, field = case
    if isinstance(request, dict):
        detail = ",".join(f"{k}={str(v)[:20]}" for k, v in request.items())
        return f"{field}:{detail}"
    return f"{field}:{request!r}"


@pytest.mark.parametrize(
    ("request_body", "field"), INVALID_REQUESTS, ids=[_case_id(c) for c in INVALID_REQUESTS]
)
def test_invalid_request_names_the_field(request_body: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        validate_request(request_body)
    error = exc_info.value
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    assert error.message
    assert isinstance(error, PaddlerError)


REQUEST_KEYS = st.one_of(
    st.sampled_from(sorted(DEFAULTS)),
    st.sampled_from(["raw_prompt", "conversation_history"]),
    st.text(max_size=6),
)


@st.composite
def requests_to_validate(draw: st.DrawFn) -> Any:
    body = draw(st.dictionaries(REQUEST_KEYS, JSONISH, max_size=6))
    prompt = draw(st.sampled_from(["none", "raw", "conversation", "both"]))
    if prompt in ("raw", "both"):
        body["raw_prompt"] = draw(st.one_of(st.text(max_size=8), JSONISH))
    if prompt in ("conversation", "both"):
        message = st.one_of(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "", 1]), "content": JSONISH}),
            JSONISH,
        )
        body["conversation_history"] = draw(st.lists(message, max_size=3))
    return body


@settings(max_examples=300, deadline=None)
@given(request_body=st.one_of(JSONISH, requests_to_validate()))
def test_validate_request_raises_only_invalid_request(request_body: Any) -> None:
    before = copy.deepcopy(request_body)
    try:
        normalized = validate_request(request_body)
    except InvalidRequest as error:
        assert isinstance(error.field, str)  # may be "": an unknown field of that name
        assert str(error).startswith(f"{error.field}: ")
        return
    finally:
        assert repr(request_body) == repr(before)  # never modified (repr: NaN != NaN)
    assert isinstance(normalized, dict)
    if "input_batch" in normalized:
        return
    assert set(normalized) >= set(DEFAULTS)
    assert isinstance(normalized["stop"], list)
    assert validate_request(normalized) == normalized  # normalizing is idempotent


# --------------------------------------------------------------------------------------
# Embedding requests (routed by ``validate_request`` on ``input_batch``)
# --------------------------------------------------------------------------------------

DOCUMENT = {"id": "doc-1", "content": "some text"}


def test_embedding_request_is_normalized() -> None:
    documents = [DOCUMENT, {"id": "", "content": "x"}]
    normalized = validate_request({"input_batch": documents})
    assert normalized == {"input_batch": documents, "normalization_method": "None"}
    assert normalized["input_batch"][0] is not documents[0]
    for method in ("None", "L2"):
        request = {"input_batch": [DOCUMENT], "normalization_method": method}
        assert validate_request(request)["normalization_method"] == method
    request = {"input_batch": [DOCUMENT], "normalization_method": {"RmsNorm": {"epsilon": 1e-6}}}
    assert validate_request(request)["normalization_method"] == {"RmsNorm": {"epsilon": 1e-6}}


INVALID_EMBEDDING_REQUESTS = [
    ({"input_batch": []}, "input_batch"),
    ({"input_batch": None}, "input_batch"),
    ({"input_batch": "some text"}, "input_batch"),
    ({"input_batch": DOCUMENT}, "input_batch"),
    ({"input_batch": [DOCUMENT] * 4097}, "input_batch"),
    ({"input_batch": [DOCUMENT], "raw_prompt": "p"}, "raw_prompt"),
    ({"input_batch": [DOCUMENT], "max_tokens": 5}, "max_tokens"),
    ({"input_batch": ["some text"]}, "input_batch[0]"),
    ({"input_batch": [{"id": "a"}]}, "input_batch[0]"),
    ({"input_batch": [{**DOCUMENT, "extra": 1}]}, "input_batch[0]"),
    ({"input_batch": [DOCUMENT, {"id": 1, "content": "x"}]}, "input_batch[1].id"),
    ({"input_batch": [{"id": None, "content": "x"}]}, "input_batch[0].id"),
    ({"input_batch": [{"id": "a", "content": ""}]}, "input_batch[0].content"),
    ({"input_batch": [{"id": "a", "content": 5}]}, "input_batch[0].content"),
    ({"input_batch": [DOCUMENT], "normalization_method": "l2"}, "normalization_method"),
    ({"input_batch": [DOCUMENT], "normalization_method": None}, "normalization_method"),
    ({"input_batch": [DOCUMENT], "normalization_method": ["L2"]}, "normalization_method"),
    (
        {"input_batch": [DOCUMENT], "normalization_method": {"RmsNorm": {}, "L2": {}}},
        "normalization_method",
    ),
    (
        {"input_batch": [DOCUMENT], "normalization_method": {"RmsNorm": {"epsilon": 0}}},
        "normalization_method.RmsNorm.epsilon",
    ),
    (
        {"input_batch": [DOCUMENT], "normalization_method": {"RmsNorm": {"epsilon": 1}}},
        "normalization_method.RmsNorm.epsilon",
    ),
    (
        {"input_batch": [DOCUMENT], "normalization_method": {"RmsNorm": {"epsilon": True}}},
        "normalization_method.RmsNorm.epsilon",
    ),
    (
        {"input_batch": [DOCUMENT], "normalization_method": {"RmsNorm": {"epsilon": math.nan}}},
        "normalization_method.RmsNorm.epsilon",
    ),
    (
        {"input_batch": [DOCUMENT], "normalization_method": {"RmsNorm": {}}},
        "normalization_method.RmsNorm.epsilon",
    ),
    (
        {"input_batch": [DOCUMENT], "normalization_method": {"RmsNorm": 0.5}},
        "normalization_method.RmsNorm.epsilon",
    ),
]


@pytest.mark.parametrize(
    ("request_body", "field"),
    INVALID_EMBEDDING_REQUESTS,
    ids=[_case_id(c) for c in INVALID_EMBEDDING_REQUESTS],
)
def test_invalid_embedding_request_names_the_field(request_body: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        validate_request(request_body)
    assert exc_info.value.field == field


def test_tool_call_frames_decode_and_malformed_ones_fail_the_stream() -> None:
    from paddler.client.events import ToolCalls, ToolCallText, decode_event
    from paddler.protocol.tool_calls import ToolCallOutcome

    call = {"id": "call_1", "name": "f", "arguments": {"x": 1}}
    body = {"outcome": "parsed", "calls": [call], "errors": [], "text": "<tool_call>"}
    event = decode_event(Kind.TOOL_CALLS, pack_body(body))
    assert isinstance(event, ToolCalls) and event.outcome.to_body() == body
    assert event.outcome.native() == {
        "ToolCallParsed": [{"id": "call_1", "name": "f", "arguments": {"ValidJson": {"x": 1}}}]
    }
    assert decode_event(Kind.TOOL_CALL, pack_body(["<tool"])) == ToolCallText(["<tool"])
    failed = ToolCallOutcome("validation_failed", errors=["bad"], text="t")
    assert failed.native() == {"ToolCallValidationFailed": ["bad"]}
    assert ToolCallOutcome("parse_failed", errors=["a", "b"]).native() == {
        "ToolCallParseFailed": "a; b"
    }
    assert ToolCallOutcome("unrecognized_format", errors=["e"], text="t").native() == {
        "UnrecognizedToolCallFormat": {"text": "t", "ffi_error_message": "e"}
    }
    for bad in (
        [],
        {**body, "outcome": "maybe"},
        {**body, "calls": [{"id": 1, "name": "f", "arguments": {}}]},
        {**body, "calls": [{"id": "c", "name": "f", "arguments": "{}"}]},
        {**body, "errors": [3]},
    ):
        failure = decode_event(Kind.TOOL_CALLS, pack_body(bad))
        assert failure.code == 502 and failure.kind == "ProtocolError", bad  # type: ignore[union-attr]
