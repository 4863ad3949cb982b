"""gunicorn runs with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``): with the
dynamic threshold, a worker's heap grew with free holes under mixed load (asyncio's
256 KiB socket reads served from the heap once glibc had raised the threshold), about
1 MB a minute with its live memory flat. An operator's own setting wins."""

from __future__ import annotations

import pytest

from paddler.http.server import MALLOC_ENV, gunicorn_env, http_config
from paddler.http.settings import HttpSettings


def test_gunicorn_gets_a_fixed_mmap_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    env = gunicorn_env(http_config(HttpSettings(), "tcp://127.0.0.1:8071"))
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(128 * 1024) == MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]


def test_an_operators_own_malloc_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    env = gunicorn_env(http_config(HttpSettings(), "tcp://127.0.0.1:8071"))
    assert env["MALLOC_MMAP_THRESHOLD_"] == "65536"
