"""Filling a llama.cpp ``llama_batch`` for one decode step (pure-Python twin).

``BatchBuilder`` writes tokens, positions, sequence ids and logits flags into
the arrays of a ``llama_batch`` allocated by ``llama_batch_init(capacity, 0, 1)``
(one sequence id per token). The compiled twin (``_batch_c.pyx``) writes the same
arrays through raw pointers; both take the ctypes ``llama_batch`` struct.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COMPILED = False


class BatchFull(Exception):
    pass


class BatchBuilder:
    def __init__(self, batch: Any, capacity: int) -> None:
        self._batch = batch
        self.capacity = capacity
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0
        self._batch.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Append one token; returns its index in the batch (where its logits land)."""
        i = self.n_tokens
        if i >= self.capacity:
            raise BatchFull(f"batch of {self.capacity} tokens is full")
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits
        self.n_tokens = i + 1
        batch.n_tokens = i + 1
        return i

    def add_span(
        self,
        tokens: Sequence[int],
        start: int,
        count: int,
        pos: int,
        seq_id: int,
        logits_last: bool,
    ) -> int:
        """Append ``tokens[start:start+count]`` at positions ``pos...``; logits only
        for the last one if ``logits_last``. Returns the index of the last token."""
        if count <= 0:
            raise ValueError("count must be positive")
        n = self.n_tokens
        if n + count > self.capacity:
            raise BatchFull(f"{count} tokens do not fit in {self.capacity - n} free places")
        batch = self._batch
        token = batch.token
        positions = batch.pos
        n_seq_id = batch.n_seq_id
        seq_ids = batch.seq_id
        logits = batch.logits
        for k in range(count):
            i = n + k
            token[i] = tokens[start + k]
            positions[i] = pos + k
            n_seq_id[i] = 1
            seq_ids[i][0] = seq_id
            logits[i] = 0
        last = n + count - 1
        if logits_last:
            logits[last] = 1
        self.n_tokens = n + count
        batch.n_tokens = n + count
        return last
