"""The wire protocol between agents, the broker and clients: data only, no sockets."""

from paddler.protocol.codec import (
    HEADER_SIZE,
    MAX_BODY_BYTES,
    decode,
    encode,
    make_header,
    pack_body,
    parse_header,
    split_frames,
    unpack_body,
)
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind

__all__ = [
    "HEADER_SIZE",
    "MAX_BODY_BYTES",
    "PROTOCOL_VERSION",
    "Kind",
    "decode",
    "encode",
    "make_header",
    "pack_body",
    "parse_header",
    "split_frames",
    "unpack_body",
]
