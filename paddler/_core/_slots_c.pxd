# Augmenting declarations: ``_slots_c.py`` (a symlink to the pure-Python twin
# ``_slots_py.py``) is compiled with these C types. Behaviour stays that of the twin.

cimport cython


cdef class _Agent:
    cdef readonly object agent_id
    cdef public Py_ssize_t slots_total
    cdef public Py_ssize_t in_flight
    cdef public bint ready
    cdef public long long stamp
    cdef public Py_ssize_t index


cdef bint _has_free_slot(_Agent agent) noexcept
cdef Py_ssize_t _free_slots_of(_Agent agent) noexcept
cdef bint _goes_first(_Agent a, _Agent b) noexcept


cdef class Registry:
    cdef dict _agents
    cdef list _eligible
    # a Python int, as in the twin: a sum of Py_ssize_t counts may not fit one
    cdef object _free_slots
    cdef long long _clock
    cdef long long _rotation
    cdef dict _holders
    cdef dict _held

    cdef long long _tick(self)

    @cython.locals(heap=list, agent=_Agent, parent=_Agent, parent_index=Py_ssize_t)
    cdef Py_ssize_t _sift_up(self, Py_ssize_t index) except -1

    @cython.locals(heap=list, agent=_Agent, child=_Agent, right=_Agent,
                   child_index=Py_ssize_t, size=Py_ssize_t)
    cdef int _sift_down(self, Py_ssize_t index) except -1

    @cython.locals(heap=list)
    cdef int _insert(self, _Agent agent) except -1

    @cython.locals(heap=list, last=_Agent, index=Py_ssize_t)
    cdef int _remove(self, _Agent agent) except -1

    cdef int _reposition(self, _Agent agent) except -1

    @cython.locals(agent=_Agent, before=Py_ssize_t)
    cpdef add(self, agent_id, slots_total, ready)

    @cython.locals(agent=_Agent)
    cpdef remove(self, agent_id)

    @cython.locals(agent=_Agent)
    cpdef object choose(self)

    @cython.locals(agent=_Agent, had_free_slot=bint)
    cpdef acquire(self, bytes agent_id, bint force=*)

    @cython.locals(agent=_Agent)
    cpdef bint release(self, bytes agent_id) except -1

    cpdef object choose_and_acquire(self)

    @cython.locals(held=dict, holders=dict, counts=dict, left=Py_ssize_t)
    cpdef hold(self, bytes agent_id, Py_ssize_t slot, list fingerprints)

    @cython.locals(agents=dict, agent=_Agent, holder=_Agent, pick=_Agent)
    cdef _Agent _pick_holder(self, dict counts, object best, Py_ssize_t bound)

    @cython.locals(holders=dict, bound=Py_ssize_t, low=Py_ssize_t, high=Py_ssize_t,
                   middle=Py_ssize_t, pick=_Agent, found=_Agent)
    cpdef tuple choose_prefix(self, list fingerprints, Py_ssize_t slack)

    cpdef tuple choose_prefix_and_acquire(self, list fingerprints, Py_ssize_t slack)


cdef class RequestBuffer:
    cdef public Py_ssize_t capacity
    cdef readonly object _order
    cdef dict _live
    cdef readonly list _heap
    cdef long long _seq


cdef class InFlight:
    cdef dict _agent_of
    cdef dict _by_agent
