"""The hot path: Cython-compiled modules with pure-Python twins of identical behaviour.

- ``slots``: the broker's agent registry, choice of agent, FIFO buffer, in-flight table;
- ``text``: per-request text assembly (UTF-8 across tokens, stop strings);
- ``batch``: filling a ``llama_batch`` for one decode step.

``PADDLER_NO_EXTENSIONS=1`` selects the twins; otherwise the compiled modules are
used when they were built. ``IMPLEMENTATION`` says which one is live: ``"c"`` or
``"py"`` (``"c"`` only when every module is compiled).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING

NO_EXTENSIONS = os.environ.get("PADDLER_NO_EXTENSIONS", "") not in ("", "0")
MODULES = ("slots", "text", "batch")


def load(name: str, compiled: bool) -> ModuleType:
    """The twin ``_{name}_py`` or, if ``compiled``, the compiled ``_{name}_c``
    (``ImportError`` if it was not built)."""
    if not compiled:
        return importlib.import_module(f"paddler._core._{name}_py")
    module = importlib.import_module(f"paddler._core._{name}_c")
    # Without a build, ``_{name}_c`` may resolve to the symlinked source: pure Python.
    if not getattr(module, "COMPILED", False):
        raise ImportError(f"paddler._core._{name}_c is not compiled")
    return module


def _load_all() -> tuple[dict[str, ModuleType], str]:
    if not NO_EXTENSIONS:
        try:
            return {name: load(name, True) for name in MODULES}, "c"
        except ImportError:
            pass
    return {name: load(name, False) for name in MODULES}, "py"


_modules, IMPLEMENTATION = _load_all()
slots = _modules["slots"]
text = _modules["text"]
batch = _modules["batch"]

if TYPE_CHECKING:
    from paddler._core._batch_py import BatchBuilder, BatchFull
    from paddler._core._slots_py import InFlight, Registry, RequestBuffer, SlotError
    from paddler._core._text_py import TextAssembler
else:
    Registry = slots.Registry
    RequestBuffer = slots.RequestBuffer
    InFlight = slots.InFlight
    SlotError = slots.SlotError
    TextAssembler = text.TextAssembler
    BatchBuilder = batch.BatchBuilder
    BatchFull = batch.BatchFull

__all__ = [
    "IMPLEMENTATION",
    "BatchBuilder",
    "BatchFull",
    "InFlight",
    "Registry",
    "RequestBuffer",
    "SlotError",
    "TextAssembler",
    "load",
]
