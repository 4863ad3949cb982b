"""Resolve the ``model`` of a desired state to a GGUF file on this agent.

The balancer names a model in one of four shapes (see ``paddler.broker.desired_state``)::

    "None"
    {"LocalToAgent": "/models/x.gguf"}
    {"Url": {"url": "https://example.com/x.gguf"}}
    {"HuggingFace": {"repo_id": "owner/repo", "revision": "main", "filename": "x.gguf"}}

``resolve_model`` turns it into a local path (or ``None``), downloading when needed.
Anything that stops a source from becoming a usable file raises ``ModelSourceError``,
whose ``issue`` is the tagged value an agent reports in its snapshot, e.g.
``{"ModelFileDoesNotExist": {"model_path": "/x.gguf"}}`` or
``{"ModelDownloadFailed": {"url": "...", "error": "HTTP 404 Not Found"}}``.

URL downloads live in ``<cache>/models/``: ``<stem>-<hash12>.<ext>`` where the hash is
over the whole URL, so two URLs never share a file. Beside each file are
``<name>.part`` (the bytes received so far; resumed with ``Range`` on the next call),
``<name>.meta.json`` (url, size, ETag, Last-Modified, complete) and ``<name>.lock``
(an advisory lock so two agents on one machine never write the same ``.part``).
Hugging Face downloads go through ``huggingface_hub.hf_hub_download`` into ``<cache>/hf``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib
import inspect
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from paddler import __version__
from paddler.errors import ConfigurationError, PaddlerError

if sys.platform != "win32":
    import fcntl

log = logging.getLogger("paddler.agent")

ProgressCallback = Callable[[int, int | None, str], None]
"""``progress(current_bytes, total_bytes_or_None, filename)``."""

CHUNK_SIZE = 1 << 20
"""Bytes read from the network per iteration of a URL download."""

PROGRESS_INTERVAL_S = 0.1
"""The least time between two progress callbacks (the final one is always made)."""

_USER_AGENT = f"paddler/{__version__}"
_MAX_ERROR_CHARS = 500


class ModelSourceError(PaddlerError):
    """A model source that cannot become a local file.

    ``issue`` is the tagged value the agent reports, with exactly one key: e.g.
    ``{"ModelFileDoesNotExist": {"model_path": "/x.gguf"}}``,
    ``{"HuggingFaceModelDoesNotExist": {"model_path": "owner/repo/main/x.gguf"}}``,
    ``{"HuggingFacePermissions": {"model_path": ...}}`` or
    ``{"ModelDownloadFailed": {"url": ..., "error": ...}}``.
    """

    def __init__(self, issue: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.issue = issue
        self.message = message

    @property
    def kind(self) -> str:
        """The tag of the issue, e.g. ``"ModelDownloadFailed"``."""
        return next(iter(self.issue))


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
) -> Path | None:
    """The local GGUF file named by ``source``, downloading it first if needed.

    ``source`` is the ``model`` (or ``multimodal_projection``) field of a validated desired
    state. ``cache_dir`` defaults to ``cache_dir()``. ``progress`` is called with
    ``(current_bytes, total_bytes_or_None, filename)`` at most every ``PROGRESS_INTERVAL_S``
    and once at the end with ``current == total``. ``show_progress`` draws a tqdm bar on
    stderr. ``hf_endpoint`` overrides ``$HF_ENDPOINT`` for Hugging Face sources.
    ``timeout_s`` bounds connecting and every wait for data.

    Returns ``None`` for ``"None"``. Raises ``ModelSourceError`` (with ``issue``) when the
    source cannot become a file and ``ConfigurationError`` when ``source`` is not a model
    source at all.
    """
    if source is None or source == "None":
        return None
    if not isinstance(source, dict) or len(source) != 1:
        raise ConfigurationError(
            "model",
            'must be "None" or one of {"LocalToAgent": ...}, {"Url": ...}, {"HuggingFace": ...}',
        )
    ((variant, data),) = source.items()
    root = _default_cache_dir() if cache_dir is None else Path(cache_dir)
    if variant == "LocalToAgent":
        if not isinstance(data, str) or not data:
            raise ConfigurationError("model.LocalToAgent", "must be a non-empty string")
        return _resolve_local(data)
    if variant == "Url":
        url = data.get("url") if isinstance(data, dict) else data
        if not isinstance(url, str) or not url:
            raise ConfigurationError("model.Url.url", "must be a non-empty string")
        return _download_url(
            url,
            root / "models",
            reporter=_Reporter(progress, _display_name(url)),
            show_progress=show_progress,
            timeout_s=timeout_s,
        )
    if variant == "HuggingFace":
        if not isinstance(data, dict):
            raise ConfigurationError("model.HuggingFace", "must be an object")
        fields: dict[str, str] = {}
        for name, default in (("repo_id", None), ("revision", "main"), ("filename", None)):
            value = data.get(name, default)
            if not isinstance(value, str) or not value:
                raise ConfigurationError(f"model.HuggingFace.{name}", "must be a non-empty string")
            fields[name] = value
        return _download_hugging_face(
            fields["repo_id"],
            fields["revision"],
            fields["filename"],
            root / "hf",
            reporter=_Reporter(progress, fields["filename"]),
            show_progress=show_progress,
            endpoint=hf_endpoint or os.environ.get("HF_ENDPOINT") or None,
            timeout_s=timeout_s,
        )
    raise ConfigurationError(
        "model", f"unknown variant {variant!r}; use LocalToAgent, Url or HuggingFace"
    )


# -- helpers shared by the sources -------------------------------------------------------


class _Reporter:
    """Forwards progress to the callback, at most every ``PROGRESS_INTERVAL_S``."""

    def __init__(self, callback: ProgressCallback | None, filename: str) -> None:
        self.filename = filename
        self._callback = callback
        self._last: float | None = None
        self._lock = threading.Lock()

    def report(self, current: int, total: int | None, *, force: bool = False) -> None:
        """Call the callback unless one was made less than ``PROGRESS_INTERVAL_S`` ago."""
        if self._callback is None:
            return
        with self._lock:
            now = time.monotonic()
            if not force and self._last is not None and now - self._last < PROGRESS_INTERVAL_S:
                return
            self._last = now
        self._callback(current, total, self.filename)


def _readable(exc: BaseException) -> str:
    """One line naming an exception: its type when the text alone would be vague."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return _readable(exc.reason) if isinstance(exc.reason, BaseException) else str(exc.reason)
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, TimeoutError):
        text = " ".join(str(exc).split())
        return f"timed out ({text})" if text and text != "timed out" else "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename:
            text = f"{text}: {exc.filename}"
    else:
        text = " ".join(str(exc).split())
    name = type(exc).__name__
    text = f"{name}: {text}" if text else name
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 1] + "…"
    return text


def _download_failed(url: str, error: str) -> ModelSourceError:
    return ModelSourceError(
        {"ModelDownloadFailed": {"url": url, "error": error}},
        f"cannot download {url}: {error}",
    )


def _resolve_local(path: str) -> Path:
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    raise ModelSourceError(
        {"ModelFileDoesNotExist": {"model_path": path}},
        f"model file does not exist: {path}",
    )


# -- URL downloads -----------------------------------------------------------------------


def _display_name(url: str) -> str:
    """The URL's last path segment, made safe as a file name (``model.gguf`` if empty)."""
    segment = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", segment).strip("._-")
    return safe or "model.gguf"


def _cache_file_name(url: str) -> str:
    """``<stem>-<hash12>.<ext>``: readable, and distinct for every distinct URL."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    stem, dot, ext = _display_name(url).rpartition(".")
    if not dot or not stem or len(ext) > 16:
        stem, ext = _display_name(url), ""
    stem = stem[:120]
    return f"{stem}-{digest}.{ext}" if ext else f"{stem}-{digest}"


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("r", encoding="utf-8") as file:
            value = json.load(file)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_meta(path: Path, meta: dict[str, Any], url: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as file:
            json.dump(meta, file, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        raise _download_failed(url, f"cannot write {path}: {_readable(exc)}") from exc


def _is_complete(final: Path, meta: dict[str, Any] | None, url: str) -> bool:
    """Whether ``final`` is a finished download of ``url`` (by its sidecar and size)."""
    if meta is None or meta.get("url") != url or meta.get("complete") is not True:
        return False
    try:
        size = final.stat().st_size
    except OSError:
        return False
    expected = meta.get("size")
    return expected is None or expected == size


def _int_header(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        return None
    return number if number >= 0 else None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(first_byte, complete_length)`` of ``Content-Range: bytes a-b/n`` (or ``*/n``)."""
    if not value:
        return None, None
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if match is None:
        return None, None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return first, total


def _if_range(meta: dict[str, Any] | None) -> str | None:
    """A validator for ``If-Range``: a strong ETag, else Last-Modified."""
    if meta is None:
        return None
    etag = meta.get("etag")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):
        return etag
    modified = meta.get("last_modified")
    return modified if isinstance(modified, str) and modified else None


@contextlib.contextmanager
def _exclusive_lock(path: Path, url: str) -> Iterator[None]:
    """Hold an advisory lock on ``path``; fail at once if another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _download_failed(url, f"cannot create {path}: {_readable(exc)}") from exc
    try:
        if sys.platform != "win32":
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _download_failed(
                    url, f"another process is downloading it into {path.parent}"
                ) from None
        yield
    finally:
        os.close(fd)


def _download_url(
    url: str,
    models_dir: Path,
    *,
    reporter: _Reporter,
    show_progress: bool,
    timeout_s: float,
) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _download_failed(url, "only http:// and https:// URLs can be downloaded")
    name = _cache_file_name(url)
    final = models_dir / name
    part = models_dir / f"{name}.part"
    meta_path = models_dir / f"{name}.meta.json"

    if _is_complete(final, _read_meta(meta_path), url):
        size = final.stat().st_size
        log.debug("model %s is cached at %s", url, final)
        reporter.report(size, size, force=True)
        return final

    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _download_failed(
            url, f"cannot create cache directory {models_dir}: {_readable(exc)}"
        ) from exc

    with _exclusive_lock(models_dir / f"{name}.lock", url):
        meta = _read_meta(meta_path)
        if _is_complete(final, meta, url):  # another process finished it meanwhile
            size = final.stat().st_size
            reporter.report(size, size, force=True)
            return final
        size = _fetch(url, part, meta_path, meta, reporter, show_progress, timeout_s)
        done = {**(_read_meta(meta_path) or {}), "url": url, "size": size, "complete": True}
        _write_meta(meta_path, done, url)
        try:
            os.replace(part, final)
        except OSError as exc:
            raise _download_failed(url, f"cannot move {part} to {final}: {_readable(exc)}") from exc
    log.info("downloaded %s to %s (%d bytes)", url, final, size)
    reporter.report(size, size, force=True)
    return final


def _fetch(
    url: str,
    part: Path,
    meta_path: Path,
    meta: dict[str, Any] | None,
    reporter: _Reporter,
    show_progress: bool,
    timeout_s: float,
) -> int:
    """Complete ``part`` from ``url``, resuming what is there; returns its final size."""
    try:
        offset = part.stat().st_size if part.is_file() else 0
    except OSError as exc:
        raise _download_failed(url, f"cannot read {part}: {_readable(exc)}") from exc
    if offset and (meta is None or meta.get("url") != url):
        log.warning("discarding %s: no record of what it was downloaded from", part)
        offset = 0
    for _ in range(3):
        size = _fetch_once(url, part, meta_path, meta, offset, reporter, show_progress, timeout_s)
        if size is not None:
            return size
        log.warning("cannot resume %s; downloading it again from the start", url)
        offset, meta = 0, None
    raise _download_failed(url, "the server keeps answering range requests inconsistently")


def _fetch_once(
    url: str,
    part: Path,
    meta_path: Path,
    meta: dict[str, Any] | None,
    offset: int,
    reporter: _Reporter,
    show_progress: bool,
    timeout_s: float,
) -> int | None:
    """One request; the final size of ``part``, or ``None`` to start over from byte 0."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
        validator = _if_range(meta)
        if validator is not None:
            headers["If-Range"] = validator
        log.info("resuming download of %s at byte %d", url, offset)
    else:
        log.info("downloading %s", url)
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        try:
            if exc.code == 416 and offset > 0:
                header = exc.headers.get("Content-Range") if exc.headers is not None else None
                _, total = _content_range(header)
                if total is None and meta is not None and isinstance(meta.get("size"), int):
                    total = meta["size"]
                if total == offset:
                    log.info("%s was already complete at %d bytes", part, offset)
                    return offset
                return None
            raise _download_failed(url, f"HTTP {exc.code} {exc.reason}".strip()) from exc
        finally:
            exc.close()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _download_failed(url, _readable(exc)) from exc

    with response:
        status = response.status
        encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
        length = (
            None if encoding != "identity" else _int_header(response.headers.get("Content-Length"))
        )
        etag = response.headers.get("ETag")
        modified = response.headers.get("Last-Modified")
        if status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != offset:
                return None
            if total is None and length is not None:
                total = offset + length
            if offset > 0 and meta is not None and _changed(meta, total, etag):
                return None
        elif status == 200:
            if offset > 0:
                log.info("server ignored the range request for %s; starting over", url)
            offset, total = 0, length
        else:
            raise _download_failed(url, f"unexpected HTTP status {status} {response.reason}")

        meta = {
            "url": url,
            "size": total,
            "etag": etag,
            "last_modified": modified,
            "complete": False,
        }
        _write_meta(meta_path, meta, url)
        return _stream(url, response, part, offset, total, reporter, show_progress)


def _changed(meta: dict[str, Any], total: int | None, etag: str | None) -> bool:
    """Whether a 206 answer describes another file than the one ``meta`` recorded."""
    known = meta.get("size")
    if known is not None and total is not None and known != total:
        return True
    recorded = meta.get("etag")
    return bool(recorded and etag and recorded != etag)


def _stream(
    url: str,
    response: http.client.HTTPResponse,
    part: Path,
    offset: int,
    total: int | None,
    reporter: _Reporter,
    show_progress: bool,
) -> int:
    """Append the response body to ``part`` (truncated first when ``offset`` is 0)."""
    bar: Any = None
    if show_progress:
        tqdm = importlib.import_module("tqdm")
        bar = tqdm.tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=reporter.filename,
            file=sys.stderr,
            leave=True,
        )
    written = offset
    try:
        try:
            file = part.open("ab" if offset else "wb")
        except OSError as exc:
            raise _download_failed(url, f"cannot write {part}: {_readable(exc)}") from exc
        with file:
            reporter.report(written, total)
            while True:
                try:
                    chunk = response.read(CHUNK_SIZE)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    raise _download_failed(
                        url, f"connection lost after {written} bytes: {_readable(exc)}"
                    ) from exc
                if not chunk:
                    break
                try:
                    file.write(chunk)
                except OSError as exc:
                    raise _download_failed(url, f"cannot write {part}: {_readable(exc)}") from exc
                written += len(chunk)
                if total is not None and written > total:
                    break
                if bar is not None:
                    bar.update(len(chunk))
                reporter.report(written, total)
            try:
                file.flush()
                os.fsync(file.fileno())
            except OSError as exc:
                raise _download_failed(url, f"cannot write {part}: {_readable(exc)}") from exc
    finally:
        if bar is not None:
            bar.close()
    if total is not None and written > total:
        part.unlink(missing_ok=True)
        raise _download_failed(url, f"the server sent more than the announced {total} bytes")
    if total is not None and written != total:
        raise _download_failed(
            url,
            f"the connection closed after {written} of {total} bytes; the next attempt resumes",
        )
    return written


# -- Hugging Face ------------------------------------------------------------------------


def _hub_progress_class(reporter: _Reporter, show_progress: bool) -> Any:
    """A tqdm subclass for ``hf_hub_download(tqdm_class=...)`` feeding ``reporter``.

    It draws on stderr only when ``show_progress``. ``update_transfer`` and
    ``set_transfer_postfix_str`` make the Xet downloader use one bar (bytes on disk)
    instead of two, so the callback never counts a byte twice.
    """
    base: Any = importlib.import_module("tqdm.std").tqdm

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)
        kwargs["disable"] = not show_progress
        kwargs["file"] = sys.stderr
        base.__init__(self, *args, **kwargs)
        self.paddler_current = int(kwargs.get("initial") or 0)
        reporter.report(self.paddler_current, _total_of(self))

    def update(self: Any, n: float | None = 1) -> Any:
        self.paddler_current += int(n or 0)
        reporter.report(self.paddler_current, _total_of(self))
        return base.update(self, n)

    def update_transfer(self: Any, n: float | None = 1) -> None:
        return None

    def set_transfer_postfix_str(self: Any, s: str = "", refresh: bool = True) -> None:
        return None

    return type(
        "PaddlerHubProgress",
        (base,),
        {
            "__init__": __init__,
            "update": update,
            "update_transfer": update_transfer,
            "set_transfer_postfix_str": set_transfer_postfix_str,
        },
    )


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
    text = _readable(exc)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and not isinstance(cause, type(exc)):
        text = f"{text} ({_hub_error_text(cause)})"
    return text[:_MAX_ERROR_CHARS]


def _http_status(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _hub_error_text(exc: BaseException) -> str:
    """``HTTP 404 Not Found (RepoNotFound: ...)`` for a Hub answer, else ``_readable``."""
    status = _http_status(exc)
    if status is None:
        return _readable(exc)
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


def _download_hugging_face(
    repo_id: str,
    revision: str,
    filename: str,
    hf_cache: Path,
    *,
    reporter: _Reporter,
    show_progress: bool,
    endpoint: str | None,
    timeout_s: float,
) -> Path:
    """``hf_hub_download`` into ``hf_cache``, its errors turned into ``ModelSourceError``.

    Progress comes from a ``tqdm_class`` hook when the installed ``huggingface_hub`` has
    one; otherwise only the start ``(0, None, filename)`` and the end ``(size, size,
    filename)`` are reported. ``timeout_s`` becomes ``etag_timeout`` (the metadata request);
    the body uses ``HF_HUB_DOWNLOAD_TIMEOUT``. When the Hub cannot be reached at all,
    ``huggingface_hub`` retries the metadata request with backoff (about 23 s in 2.x)
    before this raises ``ModelDownloadFailed``.
    """
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if endpoint is not None:
        endpoint = endpoint.rstrip("/")
    model_path = f"{repo_id}/{revision}/{filename}"
    try:
        url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    except (HFValidationError, ValueError):
        url = model_path
    hooked = "tqdm_class" in inspect.signature(hf_hub_download).parameters
    log.info("resolving %s from Hugging Face (%s)", model_path, endpoint or "default endpoint")
    if not hooked:
        reporter.report(0, None, force=True)
    try:
        if hooked:
            result = hf_hub_download(
                repo_id=repo_id,
                filename=filename,
                revision=revision,
                cache_dir=hf_cache,
                endpoint=endpoint,
                etag_timeout=timeout_s,
                tqdm_class=_hub_progress_class(reporter, show_progress),
            )
        else:
            result = hf_hub_download(
                repo_id=repo_id,
                filename=filename,
                revision=revision,
                cache_dir=hf_cache,
                endpoint=endpoint,
                etag_timeout=timeout_s,
            )
    except GatedRepoError as exc:
        raise _hub_issue("HuggingFacePermissions", model_path, exc) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as exc:
        raise _hub_issue("HuggingFaceModelDoesNotExist", model_path, exc) from exc
    except LocalEntryNotFoundError as exc:  # the Hub did not answer usably, nothing cached
        cause = exc.__cause__
        if cause is None:
            raise _download_failed(url, _readable(exc)) from exc
        if _http_status(cause) in (401, 403):
            raise _hub_issue("HuggingFacePermissions", model_path, cause) from exc
        error = (
            f"the Hub did not answer usably and the file is not cached: {_hub_error_text(cause)}"
        )
        raise _download_failed(url, error) from exc
    except EntryNotFoundError as exc:
        raise _hub_issue("HuggingFaceModelDoesNotExist", model_path, exc) from exc
    except HfHubHTTPError as exc:
        if _http_status(exc) in (401, 403):
            raise _hub_issue("HuggingFacePermissions", model_path, exc) from exc
        raise _download_failed(url, _hub_error_text(exc)) from exc
    except (OSError, ValueError) as exc:
        raise _download_failed(url, _with_cause(exc)) from exc
    except Exception as exc:
        if isinstance(exc, _loaded_transport_errors()):
            raise _download_failed(url, _with_cause(exc)) from exc
        raise
    path = Path(str(result))
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _download_failed(url, f"cannot read {path}: {_readable(exc)}") from exc
    log.info("Hugging Face model %s is at %s (%d bytes)", model_path, path, size)
    reporter.report(size, size, force=True)
    return path
