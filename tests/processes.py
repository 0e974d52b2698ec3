"""Processes seen from /proc: a job's workers, and whether they still run after the job is killed."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def any_running(pids: list[int], wait_s: float = 3.0) -> bool:
    """Whether any of `pids` still runs after waiting up to `wait_s` seconds for all to end."""
    deadline = time.monotonic() + wait_s
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return any(map(running, pids))
