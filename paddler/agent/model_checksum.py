"""The ``sha256`` a desired state may declare next to a ``Url`` or ``HuggingFace`` model.

The file is hashed before it is loaded; a mismatch is a ``ModelChecksumMismatch``
issue (``{"model_path", "expected", "actual"}``) and the file is not loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from paddler.agent.source_errors import ModelSourceError, readable

_BLOCK_BYTES = 1 << 20


def file_sha256(path: Path) -> str:
    """The SHA-256 of ``path``'s bytes, in lowercase hex."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def mismatch(model_path: str, expected: str, actual: str) -> ModelSourceError:
    return ModelSourceError(
        {
            "ModelChecksumMismatch": {
                "model_path": model_path,
                "expected": expected,
                "actual": actual,
            }
        },
        f"model {model_path} has SHA-256 {actual}, not the declared {expected}",
    )


def verify(path: Path, model_path: str, expected: str) -> str:
    """Hash ``path``; ``ModelChecksumMismatch`` unless it is ``expected``. Returns the digest."""
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise ModelSourceError(
            {"ModelCannotBeLoaded": {"model_path": model_path, "error": readable(exc)}},
            f"cannot read {path}: {readable(exc)}",
        ) from exc
    if actual != expected.lower():
        raise mismatch(model_path, expected.lower(), actual)
    return actual
