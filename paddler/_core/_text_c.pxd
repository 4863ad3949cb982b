# Augmenting declarations: ``_text_c.py`` (a symlink to the pure-Python twin
# ``_text_py.py``) is compiled with these C types. Behaviour stays that of the twin.

cimport cython


cdef class TextAssembler:
    cdef object _decoder
    cdef list _stop
    cdef unicode _pending
    cdef public bint stopped
    cdef public object stopped_by

    # ``stop`` stays untyped: a ``unicode`` local would refuse str subclasses, which
    # the twin accepts. Typed as is, a piece with stop strings costs about a third of
    # the twin's time (benchmarked on realistic token pieces); without stop strings
    # both spend their time in the UTF-8 decoder and are even.
    @cython.locals(text=unicode, pending=unicode, cut=Py_ssize_t,
                   index=Py_ssize_t, hold=Py_ssize_t, size=Py_ssize_t,
                   longest=Py_ssize_t, k=Py_ssize_t)
    cpdef unicode push(self, data)
