"""Pure encoding and decoding of frames: no sockets here.

A message on the wire is two frames after any ZeroMQ identity: a 9-byte header
``(kind: u8, request_id: u64 big-endian)`` and a msgpack body. The header stays
separate so the broker can forward token frames without unpacking their bodies;
it rewrites only the request id.

A ``TOKENS`` message from an agent carries a third frame: the ids of the tokens
whose text is in that step's pieces, packed as little-endian int32 (``pack_token_ids``).
The broker keeps those bytes (an append, no unpacking) so that a stream whose
agent is lost can continue elsewhere from the same tokens, and forwards only the
first two frames to the client.

A ``BATCH`` message packs several messages into one (``batched``, ``unbatch``): an
agent sends each engine step's frames as one, and the balancer sends each client
what one pass over its sockets gave it as one. A message per token on every hop
cost each process a wakeup per token, CPU taken from llama.cpp on a small machine;
one frame for many also costs CurveZMQ one encryption, not one per message.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import msgpack

from paddler.errors import ProtocolError
from paddler.protocol.kinds import KNOWN_KINDS, Kind
from paddler.protocol.nesting import MAX_JSON_DEPTH, too_deep_message, value_depth_exceeds

HEADER = struct.Struct(">BQ")
HEADER_SIZE = HEADER.size
MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest body accepted; sockets also set ``MAXMSGSIZE`` a little above it."""
MAX_REQUEST_ID = 2**64 - 1
MAX_ARRAY_LEN = 65_536
"""Longest array in a body: embeddings of the widest models fit."""
MAX_MAP_LEN = 8_192
_NOT_CONTAINER_HEADER = bytes(
    byte for byte in range(256) if not (0x80 <= byte <= 0x9F or 0xDC <= byte <= 0xDF)
)
"""Every byte but those that can start a map or an array (fixmap, fixarray, array
16/32, map 16/32): a body has at most as many containers as it has such bytes."""

_pack = msgpack.Packer(use_bin_type=True).pack


TOKEN_ID = struct.Struct("<i")
"""One token id in a ``TOKENS`` message's ids frame."""


def pack_token_ids(token_ids: Sequence[int]) -> bytes:
    """The ids frame of a ``TOKENS`` message (one id per step is the common case)."""
    if len(token_ids) == 1:
        return TOKEN_ID.pack(token_ids[0])
    return struct.pack(f"<{len(token_ids)}i", *token_ids)


def unpack_token_ids(data: bytes) -> list[int]:
    """Token ids packed by ``pack_token_ids`` (frames joined); ``ProtocolError`` if
    the length is not a whole number of ids."""
    if len(data) % TOKEN_ID.size:
        raise ProtocolError(f"token ids: {len(data)} bytes is not a whole number of int32")
    return list(struct.unpack(f"<{len(data) // TOKEN_ID.size}i", data))


BATCH_RECORD = struct.Struct(">BQII")
"""A message inside a ``BATCH``: its header (kind, request id), then the length of
its body and its ids frame's length plus one (0: no ids frame; 1: an empty one,
which a text frame without new tokens has); the bytes follow."""
BATCH_BYTES = 1024 * 1024
"""A batch holds at most this many bytes: a message that would take it past goes in
the next one, and a larger message goes alone, as it is (so no batch is larger than
the largest message a socket accepts)."""
_BATCH = int(Kind.BATCH)
_BATCH_PREFIX = bytes([_BATCH])
_RECORD_LENGTHS = struct.Struct(">II")


def is_batch(frames: Sequence[bytes]) -> bool:
    """Whether a message (identity removed) is a ``BATCH``."""
    return bool(frames) and frames[0][:1] == _BATCH_PREFIX


def messages_of(frames: Sequence[bytes]) -> list[list[bytes]]:
    """The messages one message carries: a ``BATCH``'s (``ProtocolError`` if it is
    malformed), or itself."""
    return unbatch(frames) if is_batch(frames) else [list(frames)]


def batched(messages: Sequence[list[bytes]]) -> list[list[bytes]]:
    """The messages (each ``[header, body]`` or ``[header, body, ids]``) as few as
    possible: runs of them packed into ``BATCH`` messages of at most ``BATCH_BYTES``,
    in order; a message alone stays as it is."""
    if len(messages) < 2:
        return list(messages)
    out: list[list[bytes]] = []
    parts: list[bytes] = []
    count = 0
    size = 0
    for frames in messages:
        body = frames[1]
        if len(frames) == 3:
            ids = frames[2]
            ids_field = len(ids) + 1
        else:
            ids = b""
            ids_field = 0
        record_size = BATCH_RECORD.size + len(body) + len(ids)
        if count and size + record_size > BATCH_BYTES:
            out.append(_batch(parts, count))
            parts, count, size = [], 0, 0
        parts += (frames[0], _RECORD_LENGTHS.pack(len(body), ids_field), body, ids)
        count += 1
        size += record_size
    if count:
        out.append(_batch(parts, count))
    return out


def _batch(parts: list[bytes], count: int) -> list[bytes]:
    if count == 1:  # headers are 9 bytes: the record's own
        header, lengths, body, ids = parts
        return [header, body, ids] if _RECORD_LENGTHS.unpack(lengths)[1] else [header, body]
    return [HEADER.pack(_BATCH, count), b"".join(parts)]


def unbatch(frames: Sequence[bytes]) -> list[list[bytes]]:
    """The messages of a ``BATCH`` message (``frames`` without identity), each as
    ``[header, body]`` or ``[header, body, ids]``; ``ProtocolError`` if it is
    malformed: a wrong count, a length past its end, a batch inside."""
    if len(frames) != 2 or len(frames[0]) != HEADER_SIZE:
        raise ProtocolError(f"a batch has 2 frames (header, records), got {len(frames)}")
    _, count = HEADER.unpack(frames[0])
    payload = frames[1]
    end = len(payload)
    if count > end // BATCH_RECORD.size:
        raise ProtocolError(f"a batch of {end} bytes cannot hold {count} messages")
    record = BATCH_RECORD.size
    unpack_from = _RECORD_LENGTHS.unpack_from
    out: list[list[bytes]] = []
    offset = 0
    for _ in range(count):
        if offset + record > end:
            raise ProtocolError("a batch ends inside a message header")
        header = payload[offset : offset + HEADER_SIZE]
        if header[0] == _BATCH:
            raise ProtocolError("a batch inside a batch")
        body_len, ids_field = unpack_from(payload, offset + HEADER_SIZE)
        start = offset + record
        offset = start + body_len + max(ids_field - 1, 0)
        if offset > end:
            raise ProtocolError("a batch ends inside a message body")
        body = payload[start : start + body_len]
        out.append(
            [header, body, payload[start + body_len : offset]] if ids_field else [header, body]
        )
    if offset != end:
        raise ProtocolError(f"{end - offset} bytes after the last message of a batch")
    return out


def make_header(kind: int, request_id: int = 0) -> bytes:
    return HEADER.pack(kind, request_id)


def parse_header(frame: bytes) -> tuple[int, int]:
    """Return ``(kind, request_id)``; raise ``ProtocolError`` on a bad header."""
    if len(frame) != HEADER_SIZE:
        raise ProtocolError(f"header frame must be {HEADER_SIZE} bytes, got {len(frame)}")
    kind, request_id = HEADER.unpack(frame)
    if kind not in KNOWN_KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    return kind, request_id


def pack_body(value: Any) -> bytes:
    return _pack(value)  # type: ignore[no-any-return]


def unpack_body(frame: bytes) -> Any:
    """The body's value; ``ProtocolError`` if it is too large, malformed or nested
    deeper than ``MAX_JSON_DEPTH`` (msgpack itself stops at 1,024 levels, past what
    the code that handles a body recurses through safely)."""
    if len(frame) > MAX_BODY_BYTES:
        raise ProtocolError(f"body of {len(frame)} bytes exceeds the limit of {MAX_BODY_BYTES}")
    try:
        value = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            use_list=True,
            # msgpack allocates a container's declared length up front: keep a small
            # frame from asking for gigabytes with nested headers
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
        )
    except (ValueError, msgpack.UnpackException) as exc:  # msgpack's errors, ExtraData...
        raise ProtocolError(f"malformed msgpack body: {exc.__class__.__name__}: {exc}") from exc
    # a glance at the bytes first (well under a microsecond); the walk only when a
    # body could hold that many containers at all
    if (
        len(frame) > MAX_JSON_DEPTH
        and len(bytes(frame).translate(None, _NOT_CONTAINER_HEADER)) > MAX_JSON_DEPTH
        and value_depth_exceeds(value)
    ):
        raise ProtocolError(f"malformed msgpack body: {too_deep_message()}")
    return value


def encode(kind: Kind, request_id: int, body: Any) -> list[bytes]:
    """Frames for one message: ``[header, body]``."""
    return [HEADER.pack(kind, request_id), _pack(body)]


def split_frames(frames: Sequence[bytes]) -> tuple[int, int, bytes]:
    """Check the frame layout of one message (identity already removed).

    Returns ``(kind, request_id, body_frame)`` without unpacking the body.
    """
    if len(frames) != 2:
        raise ProtocolError(f"a message has 2 frames (header, body), got {len(frames)}")
    kind, request_id = parse_header(frames[0])
    return kind, request_id, frames[1]


def decode(frames: Sequence[bytes]) -> tuple[int, int, Any]:
    """``(kind, request_id, body)`` of one message; ``ProtocolError`` if malformed."""
    kind, request_id, body = split_frames(frames)
    return kind, request_id, unpack_body(body)
