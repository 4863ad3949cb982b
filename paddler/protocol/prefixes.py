"""Prefix fingerprints: what a slot's KV cache holds, in a form the broker can match
requests against without a model or a tokenizer.

Both sides compute them from request content alone, as a chain: each fingerprint
hashes the one before it with the next piece of the prompt, so equal fingerprints
at depth ``i`` mean equal prompts up to piece ``i`` (up to a 64-bit collision).

- A conversation's pieces are its messages (role and text; the chain starts from
  the request's tools and template switches, which change the rendering).
- A raw prompt's pieces are blocks of ``BLOCK_CHARS`` characters (only whole blocks).

A request is matched by its own chain (``request_fingerprints``). After serving it,
an agent reports what the slot holds (``held_fingerprints``): the request's chain
extended by its answer, as the client will send it back, an assistant message (or
more characters of the raw prompt). So a chat's next turn, whose history carries
that answer, matches one piece deeper than its previous turn's prompt.

Chains are capped at ``MAX_FINGERPRINTS``; they are packed as 8-byte little-endian
values (``pack_fingerprints``) in the agent's ``SLOT_PREFIXES`` frames: a slot
holding a 20-message conversation costs 168 bytes, sent when a request ends.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from paddler.errors import ProtocolError

BLOCK_CHARS = 256
"""Characters of a raw prompt per fingerprint (about 64 tokens)."""
MAX_FINGERPRINTS = 256
"""The longest chain: deeper prefixes are not told apart (64 KiB of raw prompt)."""
_FINGERPRINT = struct.Struct("<Q")


def _digest(previous: bytes, piece: bytes) -> bytes:
    return hashlib.blake2b(previous + piece, digest_size=8).digest()


def _text(content: Any) -> str:
    """A message's text: its string, or its text parts joined (images count as their
    kind: they change the prompt, their bytes are not hashed)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict):
                out.append(part.get("text") if part.get("type") == "text" else part.get("type"))
        return "\x1f".join(str(p) for p in out)
    return ""


def _message_piece(message: Any) -> bytes:
    if not isinstance(message, dict):
        return b""
    return f"{message.get('role')}\x1e{_text(message.get('content'))}".encode(errors="replace")


def _conversation_seed(request: dict[str, Any]) -> bytes:
    switches = {
        "tools": request.get("tools") or [],
        "enable_thinking": request.get("enable_thinking", False),
    }
    header = json.dumps(switches, sort_keys=True, separators=(",", ":"), default=str)
    return _digest(b"conversation", header.encode())


def _chain(seed: bytes, pieces: list[bytes]) -> list[int]:
    out = []
    digest = seed
    for piece in pieces[:MAX_FINGERPRINTS]:
        digest = _digest(digest, piece)
        out.append(int.from_bytes(digest, "little"))
    return out


def _blocks(text: str) -> list[bytes]:
    whole = min(len(text) // BLOCK_CHARS, MAX_FINGERPRINTS)
    return [text[i * BLOCK_CHARS : (i + 1) * BLOCK_CHARS].encode() for i in range(whole)]


def request_fingerprints(request: dict[str, Any]) -> list[int]:
    """The chain of a generation request's prompt (empty for other requests)."""
    if "conversation_history" in request:
        history = request["conversation_history"]
        return _chain(_conversation_seed(request), [_message_piece(m) for m in history])
    raw = request.get("raw_prompt")
    if isinstance(raw, str):
        return _chain(b"raw", _blocks(raw))
    return []


def held_fingerprints(request: dict[str, Any], answer: str | None) -> list[int]:
    """The chain of what a slot holds after serving ``request``: its prompt, then
    ``answer`` (``None``: the request ended before it had one worth matching)."""
    if "conversation_history" in request:
        history = list(request["conversation_history"])
        if answer is not None:
            history.append({"role": "assistant", "content": answer})
        return _chain(_conversation_seed(request), [_message_piece(m) for m in history])
    raw = request.get("raw_prompt")
    if isinstance(raw, str):
        return _chain(b"raw", _blocks(raw + (answer or "")))
    return []


def pack_fingerprints(fingerprints: list[int]) -> bytes:
    return struct.pack(f"<{len(fingerprints)}Q", *fingerprints)


def unpack_fingerprints(data: bytes) -> list[int]:
    """``ProtocolError`` unless ``data`` is whole fingerprints, at most ``MAX_FINGERPRINTS``."""
    count, rest = divmod(len(data), _FINGERPRINT.size)
    if rest or count > MAX_FINGERPRINTS:
        raise ProtocolError(
            f"fingerprints: {len(data)} bytes is not at most {MAX_FINGERPRINTS} 8-byte values"
        )
    return list(struct.unpack(f"<{count}Q", data))
