"""Shared fixtures of the unit tests.

``slots_impl`` runs a test once per implementation of the slot bookkeeping:
``c`` (the Cython-compiled ``paddler._core._slots_c``) and ``py`` (the pure-Python
specification ``paddler._core._slots_py``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from types import ModuleType

import pytest
from hypothesis import settings

# When a property fails, Hypothesis's pytest plugin imports ``hypothesis.extra._patching``
# (libcst), which emits a DeprecationWarning from mypy_extensions on import; with
# ``filterwarnings = error`` that turns one failing test into an INTERNALERROR that aborts
# the whole session. Import it once here, with that warning silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    # Without libcst the import fails and the plugin skips the patch as well.
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

# No example database: the unit tests must not write files into the source tree.
settings.register_profile("paddler-unit", deadline=None, database=None)
settings.load_profile("paddler-unit")


def no_extensions() -> bool:
    """Whether ``PADDLER_NO_EXTENSIONS`` asks for the pure-Python twins (the package's rule)."""
    return os.environ.get("PADDLER_NO_EXTENSIONS", "") not in ("", "0")


def _compiled_slots() -> ModuleType:
    try:
        module = importlib.import_module("paddler._core._slots_c")
    except ImportError as exc:
        reason = f"paddler._core._slots_c cannot be imported: {exc}"
    else:
        if getattr(module, "COMPILED", False) is True:
            return module
        reason = (
            "paddler._core._slots_c is not compiled "
            f"(COMPILED={getattr(module, 'COMPILED', None)!r}, loaded from {module.__file__}); "
            "build it with `python setup.py build_ext --inplace`"
        )
    if no_extensions():
        pytest.skip(f"{reason} (PADDLER_NO_EXTENSIONS is set)")
    pytest.fail(reason, pytrace=False)


@pytest.fixture(scope="session", params=["c", "py"])
def slots_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The module holding ``Registry``, ``RequestBuffer``, ``InFlight`` and ``SlotError``."""
    if request.param == "c":
        return _compiled_slots()
    module = importlib.import_module("paddler._core._slots_py")
    assert module.COMPILED is False
    return module
