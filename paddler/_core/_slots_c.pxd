# Augmenting declarations: ``_slots_c.py`` (a symlink to the pure-Python twin
# ``_slots_py.py``) is compiled with these C types. Behaviour stays that of the twin.

cimport cython


cdef class _Agent:
    cdef public Py_ssize_t slots_total
    cdef public Py_ssize_t in_flight
    cdef public bint ready
    cdef public long long stamp


cdef class Registry:
    cdef dict _agents
    cdef long long _clock
    cdef long long _rotation

    cdef long long _tick(self)

    @cython.locals(agent=_Agent, best_in_flight=Py_ssize_t,
                   best_stamp="long long")
    cpdef object choose(self)

    @cython.locals(agent=_Agent)
    cpdef acquire(self, bytes agent_id, bint force=*)

    @cython.locals(agent=_Agent)
    cpdef bint release(self, bytes agent_id) except -1

    cpdef object choose_and_acquire(self)


cdef class RequestBuffer:
    cdef public Py_ssize_t capacity
    cdef readonly object _order
    cdef dict _live
    cdef readonly list _heap
    cdef long long _seq


cdef class InFlight:
    cdef dict _agent_of
    cdef dict _by_agent
