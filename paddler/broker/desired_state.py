"""The balancer's desired state: Paddler's ``BalancerDesiredState``, validated.

``validate_desired_state`` fills defaults for missing fields, rejects unknown
ones and wrong types, and raises ``ConfigurationError`` naming the field
(``inference_parameters.temperature``) so the HTTP layer can answer 400.
"""

from __future__ import annotations

import copy
from typing import Any

from paddler.errors import ConfigurationError

CACHE_DTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "IQ4_NL", "Q5_0", "Q5_1")
POOLING_TYPES = ("Unspecified", "None", "Mean", "Cls", "Last", "Rank")

DEFAULT_INFERENCE_PARAMETERS: dict[str, Any] = {
    "n_batch": 2048,
    "context_size": 8192,
    "embedding_batch_size": 256,
    "enable_embeddings": False,
    "image_resize_to_fit": 1024,
    "k_cache_dtype": "Q8_0",
    "v_cache_dtype": "Q8_0",
    "min_p": 0.05,
    "n_gpu_layers": 0,
    "penalty_frequency": 0.0,
    "penalty_last_n": -1,
    "penalty_presence": 0.8,
    "penalty_repeat": 1.1,
    "pooling_type": "Last",
    "temperature": 0.8,
    "top_k": 80,
    "top_p": 0.8,
}

# name -> (kind, low, high); kind "int", "float", "bool" or a tuple of allowed strings
_PARAMETER_RULES: dict[str, tuple[Any, float, float]] = {
    "n_batch": ("int", 1, 1 << 20),
    "context_size": ("int", 16, 1 << 24),
    "embedding_batch_size": ("int", 1, 1 << 20),
    "enable_embeddings": ("bool", 0, 0),
    "image_resize_to_fit": ("int", 1, 1 << 16),
    "k_cache_dtype": (CACHE_DTYPES, 0, 0),
    "v_cache_dtype": (CACHE_DTYPES, 0, 0),
    "min_p": ("float", 0.0, 1.0),
    "n_gpu_layers": ("int", 0, 1 << 16),
    "penalty_frequency": ("float", -2.0, 2.0),
    "penalty_last_n": ("int", -1, 1 << 24),
    "penalty_presence": ("float", -2.0, 2.0),
    "penalty_repeat": ("float", 0.0, 10.0),
    "pooling_type": (POOLING_TYPES, 0, 0),
    "temperature": ("float", 0.0, 100.0),
    "top_k": ("int", 0, 1 << 24),
    "top_p": ("float", 0.0, 1.0),
}

TOP_LEVEL_FIELDS = (
    "model",
    "multimodal_projection",
    "inference_parameters",
    "chat_template_override",
    "use_chat_template_override",
)


def default_desired_state() -> dict[str, Any]:
    return {
        "model": "None",
        "multimodal_projection": "None",
        "inference_parameters": dict(DEFAULT_INFERENCE_PARAMETERS),
        "chat_template_override": None,
        "use_chat_template_override": False,
    }


def _nonempty_str(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(field, "must be a non-empty string")
    return value


def _validate_source(value: Any, field: str) -> Any:
    """A model source: ``"None"``, ``{"LocalToAgent": path}``, ``{"Url": {"url"}}``,
    or ``{"HuggingFace": {"repo_id", "revision", "filename"}}``."""
    if value == "None" or value is None:
        return "None"
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigurationError(
            field,
            'must be "None" or one of {"LocalToAgent": ...}, {"Url": ...}, {"HuggingFace": ...}',
        )
    ((variant, data),) = value.items()
    if variant == "LocalToAgent":
        return {"LocalToAgent": _nonempty_str(data, f"{field}.LocalToAgent")}
    if variant == "Url":
        if isinstance(data, str):
            data = {"url": data}
        if not isinstance(data, dict):
            raise ConfigurationError(f"{field}.Url", "must be an object with 'url'")
        url = _nonempty_str(data.get("url"), f"{field}.Url.url")
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"{field}.Url.url", "must start with http:// or https://")
        extra = set(data) - {"url"}
        if extra:
            raise ConfigurationError(f"{field}.Url.{sorted(extra)[0]}", "unknown field")
        return {"Url": {"url": url}}
    if variant == "HuggingFace":
        if not isinstance(data, dict):
            raise ConfigurationError(f"{field}.HuggingFace", "must be an object")
        extra = set(data) - {"repo_id", "revision", "filename"}
        if extra:
            raise ConfigurationError(f"{field}.HuggingFace.{sorted(extra)[0]}", "unknown field")
        return {
            "HuggingFace": {
                "repo_id": _nonempty_str(data.get("repo_id"), f"{field}.HuggingFace.repo_id"),
                "revision": _nonempty_str(
                    data.get("revision", "main"), f"{field}.HuggingFace.revision"
                ),
                "filename": _nonempty_str(data.get("filename"), f"{field}.HuggingFace.filename"),
            }
        }
    raise ConfigurationError(
        field, f"unknown variant {variant!r}; use LocalToAgent, Url or HuggingFace"
    )


def _validate_parameters(value: Any) -> dict[str, Any]:
    if value is None:
        return dict(DEFAULT_INFERENCE_PARAMETERS)
    if not isinstance(value, dict):
        raise ConfigurationError("inference_parameters", "must be an object")
    out = dict(DEFAULT_INFERENCE_PARAMETERS)
    for name, raw in value.items():
        field = f"inference_parameters.{name}"
        rule = _PARAMETER_RULES.get(name)
        if rule is None:
            raise ConfigurationError(field, "unknown field")
        kind, low, high = rule
        if kind == "bool":
            if not isinstance(raw, bool):
                raise ConfigurationError(field, "must be true or false")
        elif kind == "int":
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise ConfigurationError(field, "must be an integer")
            if not low <= raw <= high:
                raise ConfigurationError(field, f"must be from {low} to {high}")
        elif kind == "float":
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ConfigurationError(field, "must be a number")
            if not low <= raw <= high:
                raise ConfigurationError(field, f"must be from {low} to {high}")
            raw = float(raw)
        elif raw not in kind:
            raise ConfigurationError(field, f"must be one of {', '.join(kind)}")
        out[name] = raw
    return out


def validate_desired_state(value: Any) -> dict[str, Any]:
    """A normalized copy of a desired state; ``ConfigurationError`` names the bad field."""
    if not isinstance(value, dict):
        raise ConfigurationError("desired_state", "must be a JSON object")
    for name in value:
        if name not in TOP_LEVEL_FIELDS:
            raise ConfigurationError(str(name), "unknown field")
    state = default_desired_state()
    state["model"] = _validate_source(value.get("model", "None"), "model")
    state["multimodal_projection"] = _validate_source(
        value.get("multimodal_projection", "None"), "multimodal_projection"
    )
    state["inference_parameters"] = _validate_parameters(value.get("inference_parameters"))
    override = value.get("chat_template_override")
    if isinstance(override, str):  # a convenience: the bare template text
        override = {"content": override}
    if override is not None:
        if (
            not isinstance(override, dict)
            or set(override) != {"content"}
            or not isinstance(override["content"], str)
        ):
            raise ConfigurationError(
                "chat_template_override", 'must be {"content": "<template>"} or null'
            )
        override = {"content": override["content"]}
    state["chat_template_override"] = override
    use_override = value.get("use_chat_template_override", False)
    if not isinstance(use_override, bool):
        raise ConfigurationError("use_chat_template_override", "must be true or false")
    if use_override and override is None:
        raise ConfigurationError(
            "use_chat_template_override", "is true but chat_template_override is null"
        )
    state["use_chat_template_override"] = use_override
    return copy.deepcopy(state)
