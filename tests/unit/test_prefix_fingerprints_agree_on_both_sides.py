"""Prefix fingerprints: what an agent says a slot holds after a request matches the
chain the broker computes for the request that comes back with that answer, and
nothing else matches it by accident."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paddler.errors import ProtocolError
from paddler.protocol.prefixes import (
    BLOCK_CHARS,
    MAX_FINGERPRINTS,
    held_fingerprints,
    pack_fingerprints,
    request_fingerprints,
    unpack_fingerprints,
)

text = st.text(max_size=80)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": text}
)


def _conversation(history: list[dict[str, str]], **switches: object) -> dict[str, object]:
    return {"conversation_history": history, "tools": [], "enable_thinking": False, **switches}


@settings(max_examples=200, deadline=None)
@given(history=st.lists(message, min_size=1, max_size=8), answer=text, next_turn=text)
def test_a_conversations_next_turn_matches_one_message_deeper(
    history: list[dict[str, str]], answer: str, next_turn: str
) -> None:
    request = _conversation(history)
    held = held_fingerprints(request, answer)
    following = _conversation(
        [*history, {"role": "assistant", "content": answer}, {"role": "user", "content": next_turn}]
    )
    assert request_fingerprints(following)[: len(held)] == held
    assert len(held) == len(history) + 1
    assert held[:-1] == request_fingerprints(request)
    # a different answer, or other tools, match only up to the prompt
    other = held_fingerprints(request, answer + "!")
    assert other[:-1] == held[:-1] and other[-1] != held[-1]
    assert held_fingerprints(_conversation(history, tools=[{"x": 1}]), answer)[0] != held[0]


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.text(min_size=0, max_size=1200),
    answer=st.text(max_size=600),
    more=st.text(max_size=300),
)
def test_a_raw_prompt_continued_with_its_answer_matches_its_whole_blocks(
    prompt: str, answer: str, more: str
) -> None:
    held = held_fingerprints({"raw_prompt": prompt}, answer)
    assert len(held) == len(prompt + answer) // BLOCK_CHARS
    assert request_fingerprints({"raw_prompt": prompt + answer + more})[: len(held)] == held
    assert held_fingerprints({"raw_prompt": prompt}, None) == request_fingerprints(
        {"raw_prompt": prompt}
    )


def test_chains_are_capped_and_pack_round_trip() -> None:
    chain = request_fingerprints({"raw_prompt": "x" * BLOCK_CHARS * (MAX_FINGERPRINTS + 5)})
    assert len(chain) == MAX_FINGERPRINTS
    assert unpack_fingerprints(pack_fingerprints(chain)) == chain
    assert len(pack_fingerprints(chain[:20])) == 160
    with pytest.raises(ProtocolError):
        unpack_fingerprints(b"\x00" * 9)
    with pytest.raises(ProtocolError):
        unpack_fingerprints(b"\x00" * 8 * (MAX_FINGERPRINTS + 1))
    assert request_fingerprints({"input_batch": []}) == []
