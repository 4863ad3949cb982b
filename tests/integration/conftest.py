from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paddler.testing.cluster import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def make_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Start clusters on free ports; everything started is stopped at the end, and the
    process logs are printed if the test failed."""
    clusters: list[LocalCluster] = []

    def make(**balancer_options: Any) -> LocalCluster:
        cluster = LocalCluster(tmp_path / f"cluster{len(clusters)}", **balancer_options)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for cluster in clusters:
            for path in sorted(cluster.log_dir.glob("*.log")):
                print(f"----- {path.name}\n{path.read_text(errors='replace')[-4000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report
