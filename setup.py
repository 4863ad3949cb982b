"""Build the optional Cython extensions of ``paddler._core``.

``PADDLER_NO_EXTENSIONS=1`` skips the build entirely; without a compiler the
build is skipped as well and the pure-Python twins are used at import time.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

NO_EXTENSIONS = os.environ.get("PADDLER_NO_EXTENSIONS", "") not in ("", "0")

# Each compiled module is the pure-Python twin itself, compiled under the ``_c``
# name next to an augmenting ``.pxd`` (the aiohttp way): the twin *is* the code.
CORE_MODULES = ["slots", "text"]
# Hand-written Cython where the twin cannot be compiled as is (raw pointers).
PYX_MODULES = ["batch"]


class OptionalBuildExt(build_ext):
    """Build extensions, but fall back to pure Python when compilation fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            print(
                f"paddler: building extensions failed ({exc}); using pure Python", file=sys.stderr
            )

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(
                f"paddler: building {ext.name} failed ({exc}); using pure Python", file=sys.stderr
            )


def extensions() -> list:  # type: ignore[type-arg]
    if NO_EXTENSIONS:
        return []
    from Cython.Build import cythonize

    sources = [f"paddler/_core/_{name}_c.py" for name in CORE_MODULES]
    sources += [f"paddler/_core/_{name}_c.pyx" for name in PYX_MODULES]
    directives = {
        "language_level": "3",
        # The twins' annotations are for mypy; C types come from the augmenting .pxd
        # only (``x: int`` would make Cython demand an exact Python int).
        "annotation_typing": False,
        # Bounds checks and negative indices stay on (Cython's defaults): a compiled
        # module raises IndexError exactly where its twin does and never reads past
        # the end of a list or buffer. Indexing raw C pointers is not checked anyway.
        "boundscheck": True,
        "wraparound": True,
    }
    return cythonize(sources, compiler_directives=directives, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
