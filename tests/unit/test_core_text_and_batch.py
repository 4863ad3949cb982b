"""Text assembly and batch filling: the compiled module and the pure twin agree."""

from __future__ import annotations

import ctypes
import itertools
import os
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paddler._core import load


def _impl(name: str, which: str) -> ModuleType:
    if which == "py":
        return load(name, False)
    try:
        return load(name, True)
    except ImportError as exc:
        if os.environ.get("PADDLER_NO_EXTENSIONS", "") not in ("", "0"):
            pytest.skip(f"{exc} (PADDLER_NO_EXTENSIONS is set)")
        pytest.fail(f"{exc}: build it with `python setup.py build_ext --inplace`", pytrace=False)


@pytest.fixture(scope="session", params=["c", "py"])
def text_impl(request: pytest.FixtureRequest) -> ModuleType:
    return _impl("text", request.param)


@pytest.fixture(scope="session", params=["c", "py"])
def batch_impl(request: pytest.FixtureRequest) -> ModuleType:
    return _impl("batch", request.param)


def _assemble(module: ModuleType, chunks: list[bytes], stop: list[str]) -> tuple[str, bool]:
    assembler = module.TextAssembler(stop)
    out = "".join(assembler.push(chunk) for chunk in chunks)
    return out + assembler.finish(), assembler.stopped


def test_utf8_split_across_tokens_is_joined(text_impl) -> None:
    data = "héllo wörld ✓ 日本".encode()
    chunks = [data[i : i + 1] for i in range(len(data))]  # byte-fallback tokens
    assembler = text_impl.TextAssembler([])
    pieces = [assembler.push(c) for c in chunks]
    assert "".join(pieces) + assembler.finish() == "héllo wörld ✓ 日本"
    assert "\ufffd" not in "".join(pieces)  # never half a character


def test_a_stop_string_spanning_tokens_is_cut_before_it(text_impl) -> None:
    text, stopped = _assemble(text_impl, [b"Hello, ", b"wor", b"ld! More"], ["world"])
    assert (text, stopped) == ("Hello, ", True)
    assembler = text_impl.TextAssembler(["xyz", "lo", "He"])
    assert assembler.stopped_by is None
    assert assembler.push(b"Hello") == ""
    assert assembler.stopped_by == "He"  # the earliest in the text, not in the list


def test_text_that_only_looks_like_a_stop_prefix_is_released(text_impl) -> None:
    assembler = text_impl.TextAssembler(["END"])
    assert assembler.push(b"the EN") == "the "
    assert assembler.push(b"D") == ""
    assert assembler.stopped
    assembler = text_impl.TextAssembler(["END"])
    assert assembler.push(b"the EN") == "the "
    assert assembler.push(b"emy") == "ENemy"
    assert assembler.finish() == ""


@given(
    text=st.text(max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    stop=st.lists(st.text(min_size=1, max_size=4), max_size=3),
)
def test_both_implementations_agree_with_the_reference(text: str, cuts: list[int], stop) -> None:
    data = text.encode()
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    expected = (text[: min(found)], True) if found else (text, False)
    for module in (load("text", False), _impl("text", "c")):
        assert _assemble(module, chunks, stop) == expected


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


def _batch(capacity: int) -> tuple[_Batch, list[object]]:
    """A llama_batch laid out like llama_batch_init(capacity, 0, 1)."""
    keep: list[object] = []
    tokens = (ctypes.c_int32 * capacity)()
    pos = (ctypes.c_int32 * capacity)()
    n_seq = (ctypes.c_int32 * capacity)()
    logits = (ctypes.c_int8 * capacity)()
    seq_rows = [(ctypes.c_int32 * 1)() for _ in range(capacity)]
    seq = (ctypes.POINTER(ctypes.c_int32) * capacity)(
        *[ctypes.cast(r, ctypes.POINTER(ctypes.c_int32)) for r in seq_rows]
    )
    keep += [tokens, pos, n_seq, logits, seq_rows, seq]
    batch = _Batch(0, tokens, None, pos, n_seq, seq, logits)
    return batch, keep


def _contents(batch: _Batch) -> list[tuple[int, int, int, int]]:
    return [
        (batch.token[i], batch.pos[i], batch.seq_id[i][0], batch.logits[i])
        for i in range(batch.n_tokens)
    ]


def test_decode_tokens_then_prompt_chunks_fill_the_batch(batch_impl) -> None:
    batch, _keep = _batch(8)
    builder = batch_impl.BatchBuilder(batch, 8)
    assert builder.add(42, 10, 0, True) == 0
    assert builder.add(43, 5, 1, True) == 1
    last = builder.add_span([7, 8, 9, 10, 11], 1, 3, 0, 2, True)
    assert last == 4 and builder.n_tokens == 5 and batch.n_tokens == 5
    assert _contents(batch) == [
        (42, 10, 0, 1),
        (43, 5, 1, 1),
        (8, 0, 2, 0),
        (9, 1, 2, 0),
        (10, 2, 2, 1),
    ]
    with pytest.raises(batch_impl.BatchFull):
        builder.add_span([1, 2, 3, 4], 0, 4, 0, 3, False)
    assert builder.n_tokens == 5  # nothing written by a refused span
    builder.clear()
    assert builder.n_tokens == 0 and batch.n_tokens == 0


@given(
    spans=st.lists(
        st.tuples(
            st.lists(st.integers(0, 30000), min_size=1, max_size=20),
            st.integers(0, 5),
            st.integers(0, 1000),
            st.booleans(),
        ),
        max_size=6,
    )
)
def test_both_batch_builders_write_the_same_arrays(spans) -> None:
    results = []
    for module in (load("batch", False), _impl("batch", "c")):
        batch, _keep = _batch(64)
        builder = module.BatchBuilder(batch, 64)
        for tokens, seq, pos, logits in spans:
            if builder.n_tokens + len(tokens) <= 64:
                builder.add_span(tokens, 0, len(tokens), pos, seq, logits)
        results.append(_contents(batch))
    assert results[0] == results[1]
