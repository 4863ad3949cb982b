"""``BatchBuilder.add_span`` reads its tokens like Python does, in both implementations.

The twin reads ``tokens[start + k]``: an index past the end raises ``IndexError`` and a
negative one counts from the end. The compiled twin must do the same, for lists and
for buffers (``array``), and never read outside the tokens it was given.
"""

from __future__ import annotations

import ctypes
import os
from array import array
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paddler._core import load

CAPACITY = 16


def _impl(which: str) -> ModuleType:
    if which == "py":
        return load("batch", False)
    try:
        return load("batch", True)
    except ImportError as exc:
        if os.environ.get("PADDLER_NO_EXTENSIONS", "") not in ("", "0"):
            pytest.skip(f"{exc} (PADDLER_NO_EXTENSIONS is set)")
        pytest.fail(f"{exc}: build it with `python setup.py build_ext --inplace`", pytrace=False)


@pytest.fixture(scope="session", params=["c", "py"])
def batch_impl(request: pytest.FixtureRequest) -> ModuleType:
    return _impl(request.param)


class _Batch(ctypes.Structure):
    _fields_ = [
        ("n_tokens", ctypes.c_int32),
        ("token", ctypes.POINTER(ctypes.c_int32)),
        ("embd", ctypes.POINTER(ctypes.c_float)),
        ("pos", ctypes.POINTER(ctypes.c_int32)),
        ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
        ("logits", ctypes.POINTER(ctypes.c_int8)),
    ]


class _Arrays:
    """A llama_batch laid out like llama_batch_init(CAPACITY, 0, 1), and its arrays."""

    def __init__(self) -> None:
        self.token = (ctypes.c_int32 * CAPACITY)()
        self.pos = (ctypes.c_int32 * CAPACITY)()
        self.n_seq = (ctypes.c_int32 * CAPACITY)()
        self.logits = (ctypes.c_int8 * CAPACITY)()
        self.seq_rows = [(ctypes.c_int32 * 1)() for _ in range(CAPACITY)]
        seq = (ctypes.POINTER(ctypes.c_int32) * CAPACITY)(
            *[ctypes.cast(r, ctypes.POINTER(ctypes.c_int32)) for r in self.seq_rows]
        )
        self.seq = seq
        self.batch = _Batch(0, self.token, None, self.pos, self.n_seq, seq, self.logits)

    def everything(self) -> list[tuple[int, ...]]:
        """Every place of every array, written or not."""
        return [
            (self.token[i], self.pos[i], self.n_seq[i], self.seq_rows[i][0], self.logits[i])
            for i in range(CAPACITY)
        ]


def _tokens(kind: str, values: list[int]) -> Any:
    """``values`` as a list, a tuple or a buffer (the compiled twin reads those through
    a typed memoryview)."""
    if kind == "array":
        return array("i", values)
    return {"list": list, "tuple": tuple}[kind](values)


def _add_span(module: ModuleType, tokens: Any, start: int, count: int) -> Any:
    """The outcome of one ``add_span``: its result or exception type, and the arrays."""
    arrays = _Arrays()
    builder = module.BatchBuilder(arrays.batch, CAPACITY)
    builder.add(99, 0, 7, True)
    try:
        outcome: Any = builder.add_span(tokens, start, count, 10, 1, True)
    except Exception as exc:
        outcome = type(exc)
    return outcome, builder.n_tokens, arrays.batch.n_tokens, arrays.everything()


@pytest.mark.parametrize("kind", ["list", "tuple", "array"])
def test_a_span_past_the_end_of_the_tokens_raises_index_error(
    batch_impl: ModuleType, kind: str
) -> None:
    tokens = _tokens(kind, [1, 2, 3])
    arrays = _Arrays()
    builder = batch_impl.BatchBuilder(arrays.batch, CAPACITY)
    with pytest.raises(IndexError):
        builder.add_span(tokens, 1, 3, 0, 0, True)  # reads tokens[3]
    with pytest.raises(IndexError):
        builder.add_span(tokens, 3, 1, 0, 0, True)
    with pytest.raises(IndexError):
        builder.add_span(tokens, -4, 1, 0, 0, True)
    assert builder.n_tokens == 0 and arrays.batch.n_tokens == 0
    # a negative start counts from the end, as in Python
    assert builder.add_span(tokens, -2, 2, 5, 0, True) == 1
    assert [arrays.token[i] for i in range(2)] == [2, 3]


@given(
    tokens=st.lists(st.integers(0, 30000), max_size=8),
    start=st.integers(-10, 10),
    count=st.integers(-1, 10),
    kind=st.sampled_from(["list", "tuple", "array"]),
)
def test_both_implementations_fail_and_write_alike(
    tokens: list[int], start: int, count: int, kind: str
) -> None:
    data = _tokens(kind, tokens)
    compiled = _add_span(_impl("c"), data, start, count)
    twin = _add_span(load("batch", False), data, start, count)
    assert compiled == twin
