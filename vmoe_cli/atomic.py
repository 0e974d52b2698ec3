"""Atomic file writes: nothing a user sees is ever half-written, whenever the process is killed.

A write goes to a temp file beside its target, created with mode 0o666 so the kernel applies the umask (0644
under the usual 022, like any other file the user writes), then renamed over the target. A failing write
removes its temp file. A kill -9 cannot: the temp name carries the writer's pid and where that pid is valid,
so the next run opening that folder removes the temp files of writers that are gone (`remove_stale_temps`)
and leaves those of live writers sharing the folder alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import time
from pathlib import Path

TEMP_NAME = re.compile(r"\..+\.(?P<space>[0-9a-f]{8})-(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")  # `_open_temp`'s names
STALE_AFTER_S = 86400.0  # a temp of another pid space is left until it is this old (no write takes this long)


def _pid_space() -> str:
    """Where a pid names one process, hashed: this boot of this kernel and this pid namespace on Linux (so
    containers and hosts sharing a folder never judge each other's pids), the host name elsewhere."""
    try:
        where = Path("/proc/sys/kernel/random/boot_id").read_text().strip() + os.readlink("/proc/self/ns/pid")
    except OSError:
        where = socket.gethostname()
    return hashlib.sha256(where.encode()).hexdigest()[:8]


PID_SPACE = _pid_space()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """`write_bytes_atomic` of UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def remove_stale_temps(folder: str | Path) -> None:
    """Remove the temp files in `folder` left by killed writers: those of this pid space whose pid is gone,
    and any older than STALE_AFTER_S."""
    for tmp in Path(folder).glob(".*.tmp"):
        match = TEMP_NAME.fullmatch(tmp.name)
        if match is None:
            continue  # not one of ours
        try:
            ours_and_dead = match["space"] == PID_SPACE and not _alive(int(match["pid"]))
            if ours_and_dead or time.time() - tmp.stat().st_mtime > STALE_AFTER_S:
                tmp.unlink()
        except FileNotFoundError:
            continue  # renamed into place or removed by another process meanwhile


def _open_temp(path: Path) -> tuple[int, Path]:
    """A new temp file beside `path`, open for writing, named `.{name}.{pid space}-{pid}.{random}.tmp`."""
    while True:
        tmp = path.with_name(f".{path.name}.{PID_SPACE}-{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp  # the kernel applies the umask
        except FileExistsError:
            continue


def _alive(pid: int) -> bool:
    """Whether process `pid` of this pid space exists (signal 0 checks without signalling; not on Windows)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
