"""By default the balancer runs at least two HTTP workers, so management has one of
its own even on a one-core machine (an inference flood cannot starve it)."""

from __future__ import annotations

import pytest

from paddler.http import settings
from paddler.http.settings import HttpSettings


@pytest.mark.parametrize(("cores", "workers"), [(1, 2), (2, 2), (3, 3), (16, 4), (None, 2)])
def test_default_http_workers(monkeypatch: pytest.MonkeyPatch, cores, workers) -> None:
    monkeypatch.setattr(settings.os, "cpu_count", lambda: cores)
    assert HttpSettings().http_workers == workers
