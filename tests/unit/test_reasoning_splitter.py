"""``ReasoningSplitter``: reasoning told apart from the answer, the markers left out,
whatever way the text is cut into pieces."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from paddler.agent.reasoning import ReasoningSplitter, thinking_markers

TEXT = "<think>\nLet me see. 2 < 3 and [x].</think>\n\nThe answer is <b>3</b>."


def _run(pieces: list[str], inside: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter("<think>", "</think>", inside=inside)
    segments = [s for piece in pieces for s in splitter.push(piece)] + splitter.finish()
    reasoning = "".join(text for is_reasoning, text in segments if is_reasoning)
    answer = "".join(text for is_reasoning, text in segments if not is_reasoning)
    return reasoning, answer


@given(cuts=st.lists(st.integers(0, len(TEXT)), max_size=12))
def test_any_cut_of_the_text_gives_the_same_split(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(TEXT)]
    pieces = [TEXT[a:b] for a, b in itertools.pairwise(bounds)]
    assert _run(pieces) == ("Let me see. 2 < 3 and [x].", "The answer is <b>3</b>.")


def test_a_prompt_that_opened_the_block_starts_inside() -> None:
    assert _run(["Hmm.</thi", "nk> Done"], inside=True) == ("Hmm.", "Done")


def test_text_that_only_looks_like_a_marker_start_is_sent_at_the_end() -> None:
    assert _run(["no thinking here <thi"]) == ("", "no thinking here <thi")
    assert _run(["<think>unfinished"]) == ("unfinished", "")


def test_markers_come_from_the_template() -> None:
    assert thinking_markers("{{ '<think>' }}{% if x %}</think>{% endif %}") == (
        "<think>",
        "</think>",
    )
    assert thinking_markers("[THINK]...[/THINK]") == ("[THINK]", "[/THINK]")
    assert thinking_markers("{{ messages }}") is None
    assert thinking_markers(None) is None
