# cython: language_level=3, boundscheck=True, wraparound=True
"""Compiled twin of ``_batch_py.py``: the same ``BatchBuilder``, writing the
``llama_batch`` arrays through raw pointers.

``tokens`` is read with bounds checks and negative indices as in Python, so a span
past its end raises ``IndexError`` here exactly where the twin raises it."""

import ctypes

from libc.stdint cimport int8_t, int32_t, uintptr_t

COMPILED = True


cdef struct llama_batch_t:
    int32_t n_tokens
    int32_t* token
    float* embd
    int32_t* pos
    int32_t* n_seq_id
    int32_t** seq_id
    int8_t* logits


class BatchFull(Exception):
    pass


cdef class BatchBuilder:
    cdef llama_batch_t* _batch
    cdef object _owner
    cdef public Py_ssize_t capacity
    cdef public Py_ssize_t n_tokens

    def __init__(self, batch, Py_ssize_t capacity):
        self._owner = batch  # keeps the ctypes struct alive
        self._batch = <llama_batch_t*><uintptr_t>ctypes.addressof(batch)
        self.capacity = capacity
        self.n_tokens = 0

    def clear(self):
        self.n_tokens = 0
        self._batch.n_tokens = 0

    cpdef Py_ssize_t add(self, int32_t token, int32_t pos, int32_t seq_id, bint logits) except -1:
        cdef Py_ssize_t i = self.n_tokens
        if i >= self.capacity:
            raise BatchFull(f"batch of {self.capacity} tokens is full")
        cdef llama_batch_t* b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits
        self.n_tokens = i + 1
        b.n_tokens = <int32_t>(i + 1)
        return i

    cpdef Py_ssize_t add_span(self, object tokens, Py_ssize_t start, Py_ssize_t count,
                              int32_t pos, int32_t seq_id, bint logits_last) except -1:
        if count <= 0:
            raise ValueError("count must be positive")
        cdef Py_ssize_t n = self.n_tokens
        if n + count > self.capacity:
            raise BatchFull(f"{count} tokens do not fit in {self.capacity - n} free places")
        cdef llama_batch_t* b = self._batch
        cdef Py_ssize_t k, i
        cdef const int32_t[:] view
        if isinstance(tokens, (list, tuple)):
            for k in range(count):
                i = n + k
                b.token[i] = <int32_t>tokens[start + k]
                b.pos[i] = pos + <int32_t>k
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq_id
                b.logits[i] = 0
        else:
            view = tokens
            for k in range(count):
                i = n + k
                b.token[i] = view[start + k]
                b.pos[i] = pos + <int32_t>k
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq_id
                b.logits[i] = 0
        cdef Py_ssize_t last = n + count - 1
        if logits_last:
            b.logits[last] = 1
        self.n_tokens = n + count
        b.n_tokens = <int32_t>(n + count)
        return last
