"""Resolve the ``model`` of a desired state to a GGUF file on this agent.

The balancer names a model in one of four shapes (see ``paddler.protocol.desired_state``)::

    "None"
    {"LocalToAgent": "/models/x.gguf"}
    {"Url": {"url": "https://example.com/x.gguf", "sha256": "<64 hex, optional>"}}
    {"HuggingFace": {"repo_id": "owner/repo", "revision": "main", "filename": "x.gguf"}}

``resolve_model`` turns it into a local path (or ``None``), downloading when needed.
Anything that stops a source from becoming a usable file raises ``ModelSourceError``,
whose ``issue`` is the tagged value an agent reports in its snapshot, e.g.
``{"ModelFileDoesNotExist": {"model_path": "/x.gguf"}}`` or
``{"ModelDownloadFailed": {"url": "...", "error": "HTTP 404 Not Found"}}``.

URL downloads (``paddler.agent.download``) live in ``<cache>/models/``, resumable, one
file per URL. Hugging Face downloads (``paddler.agent.hugging_face``) go through
``huggingface_hub.hf_hub_download`` into ``<cache>/hf``.

What an operator allows (``--model-dir``, ``--allow-model-host``, ``--max-model-bytes``,
``--model-stall-timeout``) comes as ``ModelSourceRules`` (``paddler.agent.source_rules``);
a refused source is an issue too (``ModelPathNotAllowed``, ``ModelHostNotAllowed``,
``ModelTooLarge``), and a ``sha256`` declared next to a ``Url`` or ``HuggingFace``
model is checked before the path is returned (``ModelChecksumMismatch``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from paddler.agent.download import cache_file_name as _cache_file_name  # noqa: F401 - tests use it
from paddler.agent.download import display_name, download_url
from paddler.agent.download_progress import ProgressCallback, ProgressReporter
from paddler.agent.hugging_face import download_hugging_face
from paddler.agent.source_errors import ModelSourceError
from paddler.agent.source_rules import DownloadCancelled, ModelSourceRules
from paddler.protocol.desired_state import LocalToAgent, Url, parse_model_source

__all__ = [
    "CHUNK_SIZE",
    "PROGRESS_INTERVAL_S",
    "DownloadCancelled",
    "ModelSourceError",
    "ModelSourceRules",
    "ProgressCallback",
    "cache_dir",
    "resolve_model",
]

# The two knobs below are read at every call of ``resolve_model`` (tests turn them).

CHUNK_SIZE = 1 << 20
"""Bytes read from the network per iteration of a URL download."""

PROGRESS_INTERVAL_S = 0.1
"""The least time between two progress callbacks (the final one is always made)."""


def cache_dir() -> Path:
    """The root of paddler's cache: ``$PADDLER_CACHE_DIR`` or ``~/.cache/paddler``."""
    return _default_cache_dir()


def _default_cache_dir() -> Path:
    configured = os.environ.get("PADDLER_CACHE_DIR", "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "paddler"


def resolve_model(
    source: Any,
    *,
    cache_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    show_progress: bool = False,
    hf_endpoint: str | None = None,
    timeout_s: float = 30.0,
    rules: ModelSourceRules | None = None,
    cancel: threading.Event | None = None,
) -> Path | None:
    """The local GGUF file named by ``source``, downloading it first if needed.

    ``source`` is the ``model`` (or ``multimodal_projection``) field of a validated desired
    state. ``cache_dir`` defaults to ``cache_dir()``. ``progress`` is called with
    ``(current_bytes, total_bytes_or_None, filename)`` at most every ``PROGRESS_INTERVAL_S``
    and once at the end with ``current == total``. ``show_progress`` draws a tqdm bar on
    stderr. ``hf_endpoint`` overrides ``$HF_ENDPOINT`` for Hugging Face sources.
    ``timeout_s`` bounds connecting and every wait for data. ``rules`` are the operator's
    (default ``ModelSourceRules()``: any path, any host, no size limit, 60 s stall rule).
    ``cancel``, once set, stops a download between two chunks with ``DownloadCancelled``
    (a ``ModelSourceError``); what arrived is resumed by the next call.

    Returns ``None`` for ``"None"``. Raises ``ModelSourceError`` (with ``issue``) when the
    source cannot become a file and ``ConfigurationError`` when ``source`` is not a model
    source at all.
    """
    parsed = parse_model_source(source)
    root = _default_cache_dir() if cache_dir is None else Path(cache_dir)
    rules = ModelSourceRules() if rules is None else rules
    if parsed is None:
        return None
    if isinstance(parsed, LocalToAgent):
        return rules.local_path(parsed.LocalToAgent)
    if isinstance(parsed, Url):
        url = parsed.Url.url
        return download_url(
            url,
            root / "models",
            reporter=_reporter(progress, display_name(url)),
            show_progress=show_progress,
            timeout_s=timeout_s,
            chunk_size=CHUNK_SIZE,
            rules=rules,
            sha256=parsed.Url.sha256,
            cancel=cancel,
        )
    hub = parsed.HuggingFace
    return download_hugging_face(
        hub.repo_id,
        hub.revision,
        hub.filename,
        root / "hf",
        reporter=_reporter(progress, hub.filename),
        show_progress=show_progress,
        endpoint=hf_endpoint or os.environ.get("HF_ENDPOINT") or None,
        timeout_s=timeout_s,
        rules=rules,
        sha256=hub.sha256,
        cancel=cancel,
    )


def _reporter(callback: ProgressCallback | None, filename: str) -> ProgressReporter:
    return ProgressReporter(callback, filename, interval_s=PROGRESS_INTERVAL_S)
