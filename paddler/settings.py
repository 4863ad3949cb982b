"""Declaring settings once: dataclass fields carry help text and limits.

``option(help)`` goes in a field's metadata; ``paddler.cli`` turns every field of a
settings dataclass into a typer option ``--field-name`` with the environment
variable ``PADDLER_FIELD_NAME``, and checks the limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from paddler.errors import ConfigurationError


def option(
    help: str,
    *,
    minimum: int | None = None,
    choices: Sequence[str] | None = None,
    flag: str | None = None,
    multiple: bool = False,
) -> dict[str, Any]:
    return {
        "help": help,
        "minimum": minimum,
        "choices": tuple(choices) if choices else None,
        "flag": flag,
        "multiple": multiple,
    }


def env_name(field_name: str) -> str:
    return "PADDLER_" + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def check_settings(settings: Any) -> None:
    """Raise ``ConfigurationError`` for a value outside its declared limits."""
    for f in fields(settings):
        meta = f.metadata
        value = getattr(settings, f.name)
        minimum = meta.get("minimum")
        if minimum is not None and value < minimum:
            raise ConfigurationError(flag_name(f.name), f"must be at least {minimum}, got {value}")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigurationError(
                flag_name(f.name), f"must be one of {', '.join(choices)}, got {value!r}"
            )
