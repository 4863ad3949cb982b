"""Resumable HTTP downloads of model files into a cache directory.

A URL's file is ``<models_dir>/<stem>-<hash12>.<ext>`` where the hash is over the
whole URL, so two URLs never share a file. Beside each file are ``<name>.part`` (the
bytes received so far; resumed with ``Range`` on the next call), ``<name>.meta.json``
(url, size, ETag, Last-Modified, complete, and the SHA-256 once one was asked for) and
``<name>.lock`` (an advisory lock so two agents on one machine never write the same
``.part``). Every failure is a ``ModelSourceError``: ``ModelDownloadFailed`` (a stall
included), ``ModelHostNotAllowed``, ``ModelTooLarge`` or ``ModelChecksumMismatch``; a
download whose ``cancel`` event is set stops between two chunks with
``DownloadCancelled`` (a ``ModelDownloadFailed``), its ``.part`` kept for the next call.

Connections go through ``paddler.agent.model_hosts`` (the operator's host rule, checked
on every redirect); the body is read with ``read1`` (what one ``recv`` brings), so the
``StallGuard`` of ``paddler.agent.source_rules`` sees every byte as it arrives.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib
import json
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Event
from typing import Any

from paddler import __version__
from paddler.agent.download_progress import ProgressReporter
from paddler.agent.model_checksum import file_sha256, mismatch
from paddler.agent.model_hosts import HostGate, opener
from paddler.agent.source_errors import ModelSourceError, download_failed, readable
from paddler.agent.source_rules import ModelSourceRules, StallGuard, too_large

if sys.platform != "win32":
    import fcntl

log = logging.getLogger("paddler.agent")

_USER_AGENT = f"paddler/{__version__}"


def display_name(url: str) -> str:
    """The URL's last path segment, made safe as a file name (``model.gguf`` if empty)."""
    segment = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", segment).strip("._-")
    return safe or "model.gguf"


def cache_file_name(url: str) -> str:
    """``<stem>-<hash12>.<ext>``: readable, and distinct for every distinct URL."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    stem, dot, ext = display_name(url).rpartition(".")
    if not dot or not stem or len(ext) > 16:
        stem, ext = display_name(url), ""
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
        raise download_failed(url, f"cannot write {path}: {readable(exc)}") from exc


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
        raise download_failed(url, f"cannot create {path}: {readable(exc)}") from exc
    try:
        if sys.platform != "win32":
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise download_failed(
                    url, f"another process is downloading it into {path.parent}"
                ) from None
        yield
    finally:
        os.close(fd)


def download_url(
    url: str,
    models_dir: Path,
    *,
    reporter: ProgressReporter,
    show_progress: bool,
    timeout_s: float,
    chunk_size: int,
    rules: ModelSourceRules | None = None,
    sha256: str | None = None,
    cancel: Event | None = None,
) -> Path:
    """The file of ``url`` in ``models_dir``, downloaded (or its download completed)
    unless the cache holds it whole. ``reporter`` hears the bytes on disk;
    ``show_progress`` draws a tqdm bar on stderr; ``timeout_s`` bounds connecting and
    every wait for data; ``chunk_size`` is the most bytes read per iteration. ``rules``
    (default: any host, no size limit) says which hosts, sizes and stalls are allowed;
    ``sha256``, when given, must be the file's digest (checked on a cached file too;
    a file that differs is deleted). Once ``cancel`` is set, the download stops
    between two chunks (a blocked read is cut off within ``CANCEL_POLL_S``) with
    ``DownloadCancelled``; the bytes received stay in ``.part``."""
    rules = ModelSourceRules() if rules is None else rules
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise download_failed(url, "only http:// and https:// URLs can be downloaded")
    name = cache_file_name(url)
    final = models_dir / name
    part = models_dir / f"{name}.part"
    meta_path = models_dir / f"{name}.meta.json"

    if _is_complete(final, _read_meta(meta_path), url):
        size = final.stat().st_size
        log.debug("model %s is cached at %s", url, final)
        _check_digest(url, final, meta_path, sha256)
        reporter.report(size, size, force=True)
        return final

    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise download_failed(
            url, f"cannot create cache directory {models_dir}: {readable(exc)}"
        ) from exc

    with _exclusive_lock(models_dir / f"{name}.lock", url):
        meta = _read_meta(meta_path)
        if _is_complete(final, meta, url):  # another process finished it meanwhile
            size = final.stat().st_size
            _check_digest(url, final, meta_path, sha256)
            reporter.report(size, size, force=True)
            return final
        with StallGuard(
            url, rules.stall_timeout_s, rules.stall_floor_bytes, cancel=cancel
        ) as guard:
            gate = HostGate(
                url,
                any_host=rules.any_host,
                allowed_hosts=rules.allowed_hosts,
                on_connect=guard.watch,
            )
            job = _Job(
                url,
                part,
                meta_path,
                reporter,
                show_progress,
                timeout_s,
                chunk_size,
                opener(gate),
                guard,
                rules,
            )
            size = _fetch(job, meta)
        digest = None
        if sha256 is not None:
            digest = _digest(url, part)
            if digest != sha256.lower():
                part.unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
                raise mismatch(url, sha256.lower(), digest)
        done = {**(_read_meta(meta_path) or {}), "url": url, "size": size, "complete": True}
        _write_meta(meta_path, done, url)
        try:
            os.replace(part, final)
        except OSError as exc:
            raise download_failed(url, f"cannot move {part} to {final}: {readable(exc)}") from exc
        if digest is not None:
            _record_digest(url, final, meta_path, digest)
    log.info("downloaded %s to %s (%d bytes)", url, final, size)
    reporter.report(size, size, force=True)
    return final


@dataclass(frozen=True)
class _Job:
    """What stays the same through one download's requests."""

    url: str
    part: Path
    meta_path: Path
    reporter: ProgressReporter
    show_progress: bool
    timeout_s: float
    chunk_size: int
    opener: urllib.request.OpenerDirector
    guard: StallGuard
    rules: ModelSourceRules


def _digest(url: str, path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise download_failed(url, f"cannot read {path}: {readable(exc)}") from exc


def _record_digest(url: str, final: Path, meta_path: Path, digest: str) -> None:
    """Remember ``final``'s digest with its size and mtime, so an unchanged file is not
    hashed again at every load."""
    stat = final.stat()
    meta = _read_meta(meta_path) or {}
    meta["sha256"] = {"digest": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    _write_meta(meta_path, meta, url)


def _check_digest(url: str, final: Path, meta_path: Path, sha256: str | None) -> None:
    """A cached file must have the declared digest (recorded, or computed now); one
    that has not is deleted with its record, so the next attempt downloads again."""
    if sha256 is None:
        return
    expected = sha256.lower()
    recorded = (_read_meta(meta_path) or {}).get("sha256")
    try:
        stat = final.stat()
    except OSError as exc:
        raise download_failed(url, f"cannot read {final}: {readable(exc)}") from exc
    if (
        isinstance(recorded, dict)
        and recorded.get("size") == stat.st_size
        and recorded.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(recorded.get("digest"), str)
    ):
        digest = recorded["digest"]
    else:
        digest = _digest(url, final)
    if digest != expected:
        final.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        raise mismatch(url, expected, digest)
    if recorded is None or not isinstance(recorded, dict) or recorded.get("digest") != digest:
        _record_digest(url, final, meta_path, digest)


def _fetch(job: _Job, meta: dict[str, Any] | None) -> int:
    """Complete ``part`` from ``url``, resuming what is there; returns its final size."""
    url, part = job.url, job.part
    try:
        offset = part.stat().st_size if part.is_file() else 0
    except OSError as exc:
        raise download_failed(url, f"cannot read {part}: {readable(exc)}") from exc
    if offset and (meta is None or meta.get("url") != url):
        log.warning("discarding %s: no record of what it was downloaded from", part)
        offset = 0
    for _ in range(3):
        size = _fetch_once(job, meta, offset)
        if size is not None:
            return size
        log.warning("cannot resume %s; downloading it again from the start", url)
        offset, meta = 0, None
    raise download_failed(url, "the server keeps answering range requests inconsistently")


def _fetch_once(job: _Job, meta: dict[str, Any] | None, offset: int) -> int | None:
    """One request; the final size of ``part``, or ``None`` to start over from byte 0."""
    url, part = job.url, job.part
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
    job.guard.check_cancel()
    job.guard.restart(offset)
    try:
        response = job.opener.open(request, timeout=job.timeout_s)
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
            raise download_failed(url, f"HTTP {exc.code} {exc.reason}".strip()) from exc
        finally:
            exc.close()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if job.guard.interrupted:
            raise job.guard.error() from exc
        raise download_failed(url, readable(exc)) from exc

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
            raise download_failed(url, f"unexpected HTTP status {status} {response.reason}")
        if total is not None:
            try:
                job.rules.check_size(url, total)
            except ModelSourceError:
                part.unlink(missing_ok=True)
                raise

        meta = {
            "url": url,
            "size": total,
            "etag": etag,
            "last_modified": modified,
            "complete": False,
        }
        _write_meta(job.meta_path, meta, url)
        return _stream(job, response, offset, total)


def _changed(meta: dict[str, Any], total: int | None, etag: str | None) -> bool:
    """Whether a 206 answer describes another file than the one ``meta`` recorded."""
    known = meta.get("size")
    if known is not None and total is not None and known != total:
        return True
    recorded = meta.get("etag")
    return bool(recorded and etag and recorded != etag)


def _stream(job: _Job, response: http.client.HTTPResponse, offset: int, total: int | None) -> int:
    """Append the response body to ``part`` (truncated first when ``offset`` is 0)."""
    url, part, reporter = job.url, job.part, job.reporter
    bar: Any = None
    if job.show_progress:
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
            raise download_failed(url, f"cannot write {part}: {readable(exc)}") from exc
        with file:
            reporter.report(written, total)
            while True:
                try:
                    chunk = response.read1(job.chunk_size)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    if job.guard.interrupted:
                        raise job.guard.error() from exc
                    raise download_failed(
                        url, f"connection lost after {written} bytes: {readable(exc)}"
                    ) from exc
                if not chunk:
                    break
                try:
                    file.write(chunk)
                except OSError as exc:
                    raise download_failed(url, f"cannot write {part}: {readable(exc)}") from exc
                written += len(chunk)
                if total is not None and written > total:
                    break
                if job.rules.max_bytes is not None and written > job.rules.max_bytes:
                    file.close()
                    part.unlink(missing_ok=True)
                    raise too_large(url, job.rules.max_bytes, written)
                job.guard.received(written)
                if bar is not None:
                    bar.update(len(chunk))
                reporter.report(written, total)
            if job.guard.interrupted:  # the watchdog cut the connection: not the end
                raise job.guard.error()
            try:
                file.flush()
                os.fsync(file.fileno())
            except OSError as exc:
                raise download_failed(url, f"cannot write {part}: {readable(exc)}") from exc
    finally:
        if bar is not None:
            bar.close()
    if total is not None and written > total:
        part.unlink(missing_ok=True)
        raise download_failed(url, f"the server sent more than the announced {total} bytes")
    if total is not None and written != total:
        raise download_failed(
            url,
            f"the connection closed after {written} of {total} bytes; the next attempt resumes",
        )
    return written
