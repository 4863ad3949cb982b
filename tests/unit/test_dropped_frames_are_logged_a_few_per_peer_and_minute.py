"""Malformed frames are dropped and counted one by one, but logged only a few per peer
and minute, then summed up in one line: an unauthenticated peer cannot fill the disk
(10,000 bad frames in 3 s used to write 5,603 lines)."""

from __future__ import annotations

import logging

import pytest

from paddler.broker.metrics import OTHER_SOURCES, LogBudget
from paddler.broker.settings import BrokerSettings
from paddler.broker.state import DROP_LOG_PEERS, DROPS_LOGGED_PER_PEER, Broker


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [record.getMessage() for record in caplog.records if record.name == "paddler.broker"]
    caplog.clear()
    return lines


def test_ten_thousand_bad_frames_from_one_peer_write_a_few_lines_and_one_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="paddler.broker")
    broker = Broker(BrokerSettings())
    for i in range(10_000):  # in 3 s
        broker.on_client_message(b"attacker", [b"not a header"], 100.0 + i * 0.0003)
    assert broker.metrics.dropped_frames == 10_000  # /metrics still counts every one
    lines = _lines(caplog)
    assert len(lines) == DROPS_LOGGED_PER_PEER
    assert lines[0] == "dropped a frame from client 61747461636b6572: bad frame layout (1 frames)"

    broker.tick(130.0)
    assert _lines(caplog) == []  # the minute is not over
    broker.tick(160.5)
    assert _lines(caplog) == [
        f"{10_000 - DROPS_LOGGED_PER_PEER} more frames dropped from client "
        "61747461636b6572 in the last 60 s"
    ]
    broker.tick(400.0)
    assert _lines(caplog) == []  # nothing held back, nothing to say

    broker.on_client_message(b"attacker", [b"again"], 401.0)  # a new minute: logged again
    assert len(_lines(caplog)) == 1
    assert broker.metrics.dropped_frames == 10_001


def test_a_flood_of_peers_keeps_the_table_and_the_log_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="paddler.broker")
    broker = Broker(BrokerSettings())
    for i in range(5_000):  # a peer that reconnects with a new identity each time
        broker.on_agent_message(i.to_bytes(5, "big"), [b"x", b"y", b"z"], 10.0)
    assert broker.metrics.dropped_frames == 5_000
    assert len(broker.drop_log) == DROP_LOG_PEERS + 1  # and one shared by the rest
    assert len(_lines(caplog)) == DROP_LOG_PEERS + DROPS_LOGGED_PER_PEER
    broker.tick(70.0)
    assert _lines(caplog) == [
        f"{5_000 - DROP_LOG_PEERS - DROPS_LOGGED_PER_PEER} more frames dropped from "
        f"{OTHER_SOURCES} in the last 60 s"
    ]
    assert len(broker.drop_log) == 0


def test_a_log_budget_counts_per_source_and_window() -> None:
    budget = LogBudget(lines_per_window=2, window_s=10.0, max_sources=2)
    assert [budget.allow("a", 0.0) for _ in range(4)] == [True, True, False, False]
    assert budget.allow("b", 1.0)
    assert budget.allow("c", 1.0) and budget.allow("d", 1.0)  # the others share a window
    assert not budget.allow("e", 1.0) and not budget.allow("c", 2.0)
    assert budget.ended(9.9) == []
    assert budget.ended(10.0) == [("a", 2)]
    assert budget.ended(11.0) == [(OTHER_SOURCES, 2)]  # "b" held nothing back
    assert len(budget) == 0
