"""The hot path: Cython-compiled modules with pure-Python twins of identical behaviour.

``PADDLER_NO_EXTENSIONS=1`` selects the twins; otherwise the compiled modules are
used when they were built. ``IMPLEMENTATION`` says which one is live: ``"c"`` or ``"py"``.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

NO_EXTENSIONS = os.environ.get("PADDLER_NO_EXTENSIONS", "") not in ("", "0")


def _load() -> tuple[ModuleType, str]:
    from paddler._core import _slots_py

    if NO_EXTENSIONS:
        return _slots_py, "py"
    try:
        from paddler._core import _slots_c
    except ImportError:  # pragma: no cover - not built
        return _slots_py, "py"
    # Without a build, ``_slots_c`` resolves to the symlinked source: still pure Python.
    if not getattr(_slots_c, "COMPILED", False):
        return _slots_py, "py"
    return _slots_c, "c"


slots, IMPLEMENTATION = _load()

if TYPE_CHECKING:
    from paddler._core._slots_py import InFlight, Registry, RequestBuffer, SlotError
else:
    Registry = slots.Registry
    RequestBuffer = slots.RequestBuffer
    InFlight = slots.InFlight
    SlotError = slots.SlotError

__all__ = ["IMPLEMENTATION", "InFlight", "Registry", "RequestBuffer", "SlotError", "slots"]
