"""Model files from the Hugging Face Hub, through ``huggingface_hub.hf_hub_download``.

The Hub's errors become ``ModelSourceError`` issues (``HuggingFaceModelDoesNotExist``,
``HuggingFacePermissions``, ``ModelDownloadFailed``); its progress bar feeds the
agent's progress reports.

The operator's rules (``paddler.agent.source_rules``) apply as far as the Hub client
lets them: the endpoint's host is checked before the first request, and every request
the shared ``httpx`` client sends while the download runs (redirects to a CDN
included) is checked by a request hook; the size limit and the stall rule are applied
by the progress hook (a stall that sends no byte at all ends at the Hub client's own
read timeout, ``HF_HUB_DOWNLOAD_TIMEOUT``). Files fetched by the Xet protocol (the
``hf_xet`` package) bypass the ``httpx`` client: their host is not re-checked.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paddler.agent.download_progress import ProgressReporter
from paddler.agent.model_checksum import verify
from paddler.agent.model_hosts import HostGate
from paddler.agent.source_errors import (
    MAX_ERROR_CHARS,
    ModelSourceError,
    download_failed,
    readable,
)
from paddler.agent.source_rules import ModelSourceRules, StallGuard, too_large

log = logging.getLogger("paddler.agent")


@dataclass(frozen=True)
class _Limits:
    """What the progress hook enforces: the size limit and the stall rule."""

    url: str
    max_bytes: int | None
    guard: StallGuard | None

    def check(self, current: int, total: int | None) -> None:
        if self.max_bytes is not None:
            if total is not None and total > self.max_bytes:
                raise too_large(self.url, self.max_bytes, total)
            if current > self.max_bytes:
                raise too_large(self.url, self.max_bytes, current)
        if self.guard is not None:
            self.guard.received(current)


def _hub_progress_class(
    reporter: ProgressReporter, show_progress: bool, limits: _Limits | None = None
) -> type[Any]:
    """A tqdm subclass for ``hf_hub_download(tqdm_class=...)`` feeding ``reporter``.

    It draws on stderr only when ``show_progress``. What it relies on, and why:

    - ``tqdm_class`` itself, a documented parameter (the caller checks it exists);
    - tqdm's public ``update(n)`` (``n`` may be negative: a retry that starts over)
      and ``total`` (the Xet downloader may set it late). The bar keeps its own count:
      a disabled tqdm counts nothing;
    - ``name``, which some ``huggingface_hub`` versions pass to any class and plain
      tqdm rejects: dropped;
    - ``update_transfer`` and ``set_transfer_postfix_str``, the hooks by which the Xet
      downloader (``huggingface_hub`` 1.x and 2.x) sees a class that aggregates and
      uses one bar (bytes on disk) instead of two. They are not a public API: should
      a version stop calling them and draw a second (network) bar, the report is the
      largest count of the download's bars, so no byte is counted twice.
    """
    base: Any = importlib.import_module("tqdm.std").tqdm
    bars: list[Any] = []  # every bar of this download
    lock = threading.Lock()

    def report(bar: Any) -> None:
        with lock:
            current = max(other.paddler_current for other in bars)
        if limits is not None:
            limits.check(current, _total_of(bar))
        reporter.report(current, _total_of(bar))

    class PaddlerHubProgress(base):  # type: ignore[misc]  # tqdm ships no type hints
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = not show_progress
            kwargs["file"] = sys.stderr
            super().__init__(*args, **kwargs)
            self.paddler_current = int(kwargs.get("initial") or 0)
            with lock:
                bars.append(self)
            report(self)

        def update(self, n: float | None = 1) -> Any:
            self.paddler_current += int(n or 0)
            report(self)
            return super().update(n)

        def update_transfer(self, n: float | None = 1) -> None:
            return None

        def set_transfer_postfix_str(self, s: str = "", refresh: bool = True) -> None:
            return None

    return PaddlerHubProgress


def _total_of(bar: Any) -> int | None:
    total = getattr(bar, "total", None)
    return int(total) if isinstance(total, int | float) and total > 0 else None


def _loaded_transport_errors() -> tuple[type[BaseException], ...]:
    """The base errors of the HTTP clients already loaded (httpx2, httpx, requests)."""
    found: list[type[BaseException]] = []
    for module_name, attribute in (
        ("httpx2", "HTTPError"),
        ("httpx", "HTTPError"),
        ("requests", "RequestException"),
    ):
        module = sys.modules.get(module_name)
        candidate = getattr(module, attribute, None) if module is not None else None
        if isinstance(candidate, type) and issubclass(candidate, BaseException):
            found.append(candidate)
    return tuple(found)


def _with_cause(exc: BaseException) -> str:
    text = readable(exc)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and not isinstance(cause, type(exc)):
        text = f"{text} ({_hub_error_text(cause)})"
    return text[:MAX_ERROR_CHARS]


def _http_status(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _hub_error_text(exc: BaseException) -> str:
    """``HTTP 404 Not Found (RepoNotFound: ...)`` for a Hub answer, else ``_readable``."""
    status = _http_status(exc)
    if status is None:
        return readable(exc)
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    reason = getattr(response, "reason_phrase", None) or getattr(response, "reason", None)
    text = f"HTTP {status} {reason}" if isinstance(reason, str) and reason else f"HTTP {status}"
    details = [str(v) for v in (headers.get("X-Error-Code"), headers.get("X-Error-Message")) if v]
    return f"{text} ({': '.join(details)})" if details else text


def _hub_issue(kind: str, model_path: str, exc: BaseException) -> ModelSourceError:
    what = {
        "HuggingFaceModelDoesNotExist": "Hugging Face model does not exist",
        "HuggingFacePermissions": "no permission to download the Hugging Face model",
    }[kind]
    return ModelSourceError(
        {kind: {"model_path": model_path}}, f"{what}: {model_path} ({_hub_error_text(exc)})"
    )


def download_hugging_face(
    repo_id: str,
    revision: str,
    filename: str,
    hf_cache: Path,
    *,
    reporter: ProgressReporter,
    show_progress: bool,
    endpoint: str | None,
    timeout_s: float,
    rules: ModelSourceRules | None = None,
    sha256: str | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """``hf_hub_download`` into ``hf_cache``, its errors turned into ``ModelSourceError``.

    Progress comes from a ``tqdm_class`` hook when the installed ``huggingface_hub`` has
    one; otherwise only the start ``(0, None, filename)`` and the end ``(size, size,
    filename)`` are reported. ``timeout_s`` becomes ``etag_timeout`` (the metadata request);
    the body uses ``HF_HUB_DOWNLOAD_TIMEOUT``. When the Hub cannot be reached at all,
    ``huggingface_hub`` retries the metadata request with backoff (about 23 s in 2.x)
    before this raises ``ModelDownloadFailed``. ``rules`` (default: any host, no size
    limit) are applied as the module says; ``sha256``, when given, must be the file's
    digest (a file that differs is removed from the cache). Once ``cancel`` is set,
    the download stops at its next progress report with ``DownloadCancelled`` (whether
    the Hub client keeps what arrived depends on its version: 2.x does not); without
    the progress hook, only before it starts.
    """
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HFValidationError

    if endpoint is not None:
        endpoint = endpoint.rstrip("/")
    model_path = f"{repo_id}/{revision}/{filename}"
    try:
        url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    except (HFValidationError, ValueError):
        url = model_path
    hooked = "tqdm_class" in inspect.signature(hf_hub_download).parameters
    log.info("resolving %s from Hugging Face (%s)", model_path, endpoint or "default endpoint")
    rules = ModelSourceRules() if rules is None else rules
    with contextlib.ExitStack() as scope:
        gate = HostGate(url, any_host=rules.any_host, allowed_hosts=rules.allowed_hosts)
        if not gate.any_host:
            from huggingface_hub import constants

            gate.check_url(endpoint or constants.ENDPOINT)
            scope.enter_context(_checked_requests(gate))
        guard = StallGuard(url, rules.stall_timeout_s, rules.stall_floor_bytes, cancel=cancel)
        guard.check_cancel()
        limits = _Limits(url, rules.max_bytes, guard)
        path = _download(
            repo_id,
            revision,
            filename,
            hf_cache,
            reporter=_hub_progress_class(reporter, show_progress, limits) if hooked else None,
            plain_reporter=reporter,
            endpoint=endpoint,
            timeout_s=timeout_s,
            url=url,
            model_path=model_path,
        )
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise download_failed(url, f"cannot read {path}: {readable(exc)}") from exc
    if rules.max_bytes is not None and size > rules.max_bytes:
        raise too_large(url, rules.max_bytes, size)
    if sha256 is not None:
        try:
            verify(path, model_path, sha256)
        except ModelSourceError as exc:
            if exc.kind == "ModelChecksumMismatch":
                _forget(path)
            raise
    log.info("Hugging Face model %s is at %s (%d bytes)", model_path, path, size)
    reporter.report(size, size, force=True)
    return path


def _forget(path: Path) -> None:
    """Remove a cached Hub file (its blob and the snapshot's link to it)."""
    with contextlib.suppress(OSError):
        path.resolve().unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _checked_requests(gate: HostGate) -> Iterator[None]:
    """Check the host of every request the Hub's shared client sends meanwhile."""
    from huggingface_hub import get_session

    hooks = get_session().event_hooks.setdefault("request", [])

    def check(request: Any) -> None:
        gate.check_url(str(request.url))

    hooks.append(check)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            hooks.remove(check)


def _raised_by_hook(exc: BaseException) -> ModelSourceError | None:
    """The ``ModelSourceError`` a hook raised, should the Hub client have wrapped it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ModelSourceError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _download(
    repo_id: str,
    revision: str,
    filename: str,
    hf_cache: Path,
    *,
    reporter: type[Any] | None,
    plain_reporter: ProgressReporter,
    endpoint: str | None,
    timeout_s: float,
    url: str,
    model_path: str,
) -> Path:
    """``hf_hub_download``, its errors turned into ``ModelSourceError``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hooked = reporter is not None
    if not hooked:
        plain_reporter.report(0, None, force=True)
    try:
        try:
            result = hf_hub_download(
                repo_id=repo_id,
                filename=filename,
                revision=revision,
                cache_dir=hf_cache,
                endpoint=endpoint,
                etag_timeout=timeout_s,
                tqdm_class=reporter,  # None: huggingface_hub's own bar
            )
        except Exception as exc:
            raised = _raised_by_hook(exc)
            if raised is not None:
                raise raised from None
            raise
    except ModelSourceError:  # raised by a hook: a refused host, a size limit, a stall
        raise
    except GatedRepoError as exc:
        raise _hub_issue("HuggingFacePermissions", model_path, exc) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as exc:
        raise _hub_issue("HuggingFaceModelDoesNotExist", model_path, exc) from exc
    except LocalEntryNotFoundError as exc:  # the Hub did not answer usably, nothing cached
        cause = exc.__cause__
        if cause is None:
            raise download_failed(url, readable(exc)) from exc
        if _http_status(cause) in (401, 403):
            raise _hub_issue("HuggingFacePermissions", model_path, cause) from exc
        error = (
            f"the Hub did not answer usably and the file is not cached: {_hub_error_text(cause)}"
        )
        raise download_failed(url, error) from exc
    except EntryNotFoundError as exc:
        raise _hub_issue("HuggingFaceModelDoesNotExist", model_path, exc) from exc
    except HfHubHTTPError as exc:
        if _http_status(exc) in (401, 403):
            raise _hub_issue("HuggingFacePermissions", model_path, exc) from exc
        raise download_failed(url, _hub_error_text(exc)) from exc
    except (OSError, ValueError) as exc:
        raise download_failed(url, _with_cause(exc)) from exc
    except Exception as exc:
        if isinstance(exc, _loaded_transport_errors()):
            raise download_failed(url, _with_cause(exc)) from exc
        raise
    return Path(str(result))
