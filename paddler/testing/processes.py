"""Looking at this machine's processes through ``/proc``, for tests that check
nothing is left behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    parent: int
    cmdline: bytes


def live_processes() -> Iterator[ProcessInfo]:
    """Every process that is not a zombie (those that vanish while read are skipped)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            yield ProcessInfo(int(entry), int(fields[1]), cmdline)


def processes_with(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    return [p.pid for p in live_processes() if text.encode() in p.cmdline]


def descends_from(pid: int, ancestor: int) -> bool:
    parents = {p.pid: p.parent for p in live_processes()}
    while pid > 1:
        if pid == ancestor:
            return True
        pid = parents.get(pid, 0)
    return False
