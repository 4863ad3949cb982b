"""Children that die with their parent.

paddler starts processes of its own: gunicorn under ``paddler balancer``, a balancer
and agents under ``paddler cluster``. They run in sessions of their own (so a Ctrl-C
in a terminal reaches only the parent, which stops them in order), which also means
nothing stops them when their parent is killed with SIGKILL: they would go on holding
their ports. On Linux, ``die_with_parent()`` gives ``subprocess.Popen`` a
``preexec_fn`` that asks the kernel (``prctl(PR_SET_PDEATHSIG)``) to send the child a
signal when its parent goes. The setting survives ``execve`` of an ordinary binary.

Two caveats of ``PR_SET_PDEATHSIG``:

- the signal fires when the *thread* that forked the child exits, not the process:
  fork from the main thread (paddler does), never from a short-lived worker thread;
- a parent that dies between ``fork`` and ``prctl`` sends nothing, so the child
  compares ``getppid()`` with the pid it expects right after ``prctl`` and exits if
  they differ.

gunicorn's workers need nothing of this: each checks once a second that its master is
still its parent, and exits otherwise.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger("paddler.lifetime")

PR_SET_PDEATHSIG = 1
"""From ``<linux/prctl.h>``."""

ORPHANED_EXIT_STATUS = 70
"""The exit status of a child whose parent died before ``prctl`` took effect."""


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that makes the child receive ``signum``
    when this process dies; ``None`` (nothing to do) where the platform cannot."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        log.warning(
            "a child forked from thread %s gets its parent-death signal when that thread "
            "exits, not when this process does",
            threading.current_thread().name,
        )
    # Resolved here, in the parent: the child between fork and exec does as little as it can.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
            os._exit(ORPHANED_EXIT_STATUS)

    return preexec
