from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paddler.testing.cluster import LocalCluster

pytestmark = pytest.mark.integration

CLUSTERS = pytest.StashKey[list[LocalCluster]]()
"""The clusters a test started, for its report."""


@pytest.fixture
def make_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Start clusters on free ports; everything started is stopped at the end. The
    report of a failed test shows the end of every process log, and so does that of a
    failed setup (a fixture that starts a cluster)."""
    clusters: list[LocalCluster] = []
    request.node.stash[CLUSTERS] = clusters

    def make(**balancer_options: Any) -> LocalCluster:
        cluster = LocalCluster(tmp_path / f"cluster{len(clusters)}", **balancer_options)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for cluster in item.stash.get(CLUSTERS, []):
            for path in sorted(cluster.log_dir.glob("*.log")):
                log = path.read_text(errors="replace")[-4000:]
                report.sections.append((f"{cluster.log_dir.name}/{path.name}", log))
    return report
