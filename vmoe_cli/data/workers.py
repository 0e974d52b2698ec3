"""Worker processes of the data commands (`vmoe shard`, `vmoe shard-index`): spawned, so they inherit nothing of
the main process's memory or threads, and tied to the main process, so that none outlives it (kill -9 included)
to keep writing or reading shards nobody waits for."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.pool import Pool
from typing import Any

PR_SET_PDEATHSIG = 1  # Linux prctl: the signal a process gets when its parent dies


def spawn_pool(workers: int, setup: Callable[..., None] | None = None, setup_args: tuple[Any, ...] = ()) -> Pool:
    """A pool of `workers` spawned processes that die with this one, each running `setup(*setup_args)` once."""
    ctx = multiprocessing.get_context("spawn")
    return ctx.Pool(workers, initializer=_start, initargs=(os.getpid(), setup, setup_args))


def _start(parent: int, setup: Callable[..., None] | None, setup_args: tuple[Any, ...]) -> None:
    """Worker start: die with the parent; Ctrl-C is the parent's to handle (it terminates the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # the kernel kills us when the parent dies, kill -9 too
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    exit_if_orphaned(parent)  # it died before that was armed
    if setup is not None:
        setup(*setup_args)


def exit_if_orphaned(parent: int) -> None:
    """Exit at once when the main process `parent` is gone (the check behind the parent-death signal, and the
    only one where that signal does not exist)."""
    if os.getppid() != parent:
        os._exit(1)
