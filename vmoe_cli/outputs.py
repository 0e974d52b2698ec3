"""Where a command writes: checked before any work starts, and held by one writer at a time.

Every command that writes checks its output location first (`writable_dir`, `writable_file`), so a wrong
--out costs one line, not a finished computation, and creates nothing. A command that keeps writing a
directory for its whole life (pretrain, finetune, sweep-capacity) holds `run_lock` on it: an flock on
DIR/.lock. The kernel drops the lock when its process ends, however it ends (kill -9 included), so a lock
is never stale and nothing needs cleaning up. The holder writes its pid (and host) into the file only so
that a second writer's message can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from vmoe_cli.errors import VmoeError

LOCK = ".lock"
_held: dict[Path, int] = {}  # directory -> lock fd, of the locks this process holds


def _forget_in_child() -> None:
    """A forked child (a data-loader worker) holds nothing: it closes its copies of the lock fds, so that a lock
    ends with the process that took it, not with its last child."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def writable_dir(path: str | Path, option: str) -> Path:
    """`path`, if it is or can become a folder this process writes into; a one-line VmoeError otherwise."""
    path = Path(path)
    _check_folder(path, option, path)
    return path


def writable_file(path: str | Path, option: str) -> Path:
    """`path`, if a file can be written there (its folder exists or can be created); a one-line VmoeError
    otherwise."""
    path = Path(path)
    if path.is_dir():
        raise VmoeError(f"{option} {path}: is a folder; give a file name, e.g. {path / 'results.json'}")
    _check_folder(path.parent, option, path)
    return path


def _check_folder(folder: Path, option: str, given: Path) -> None:
    """`folder`'s nearest existing ancestor (itself included) must be a folder where a file can be created."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # "/" or "." at worst
    if not existing.is_dir():
        what = "is a file" if existing == given else f"{existing} is a file"
        raise VmoeError(f"{option} {given}: {what}, not a folder; choose another {option}")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # the one true test (permissions, ACLs, read-only mounts)
    except OSError as e:
        raise VmoeError(
            f"{option} {given}: cannot write in {existing} ({e.strerror}); choose another {option}"
        ) from None


@contextlib.contextmanager
def run_lock(run_dir: str | Path, option: str = "--out") -> Iterator[Path]:
    """Hold `run_dir` (created if missing) as its only writer for the block; a second holder, in any process,
    gets a one-line VmoeError naming this one's pid. Nested in one process, the inner run_lock is a no-op."""
    run_dir = writable_dir(run_dir, option)
    key = run_dir.resolve()
    if key in _held:
        yield run_dir
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise VmoeError(
            f"{option} {run_dir}: cannot create {LOCK} there ({e.strerror}); choose another {option}"
        ) from None
    try:
        _acquire(fd, run_dir, option)
        _held[key] = fd
        yield run_dir
    finally:
        _held.pop(key, None)
        os.close(fd)  # releases the lock


def _acquire(fd: int, run_dir: Path, option: str) -> None:
    """Take the lock without waiting, then sign it with this process's pid and host."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise VmoeError(
            f"{run_dir}: another vmoe process ({_holder(fd)}) is writing here; wait for it or choose another {option}"
        ) from None
    except OSError as e:  # a filesystem without locks
        raise VmoeError(
            f"{option} {run_dir}: cannot lock {LOCK} there ({e.strerror}); choose another {option}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


def _holder(fd: int) -> str:
    """'pid N' of the lock's holder, with its host when that is another machine."""
    for _ in range(50):  # the holder signs just after taking the lock: give it a moment
        pid, _, host = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
        if pid:
            return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
        time.sleep(0.01)
    return "pid unknown"
