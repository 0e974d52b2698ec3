"""How long phases show their progress: a rich bar on a terminal, plain lines a log file keeps otherwise.

Every phase that can last more than a few seconds (sharding, verification, a cache fill, feature extraction, a
sweep pass, training) reports through one function, `show(what, done, total, unit="images")`; a library
function takes it as an optional `progress` argument and the command supplies a `Display`. Without a terminal
(a log file, a cluster job) a phase prints one line every `interval` seconds and a final one, flushed, e.g.

    features shards/fmnist test: 4,096/10,000 (41%) 812 images/s, ETA 7 s

The rate counts from the first value this process saw, so a resumed job reports its own speed. Imports only
errors.py of vmoe: every floor may use it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID
from rich.text import Text

from vmoe_cli.errors import VmoeError

INTERVAL_ENV = "VMOE_PROGRESS_INTERVAL"  # seconds between a phase's plain lines (default INTERVAL_S)
INTERVAL_S = 10.0


class ProgressFn(Protocol):
    """`show(what, done, total, unit)`: `done` of `total` (None: unknown) `unit`s of phase `what` are done."""

    def __call__(self, what: str, done: int, total: int | None, unit: str = "images") -> None: ...


@dataclass
class Phase:
    """One phase's counts and clock, from the first value this process saw of it."""

    total: int | None
    unit: str
    first: int  # the first `done` seen: where this process started (a resumed job's position)
    start: float  # time.monotonic() of that first value
    done: int
    shown: float = -math.inf  # when the last plain line was printed
    shown_done: int | None = None  # the `done` it showed
    finished: bool = False  # its final line is out

    def status(self, now: float) -> str:
        """`4,096/10,000 (41%) 812 images/s, ETA 7 s`; once done, the time taken replaces the ETA; without a total,
        `1,024 shards, 3.1 shards/s`."""
        elapsed = now - self.start
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        speed = f"{self._rate(rate)}" if rate > 0 else ""
        if self.total is None:
            counted = self._count(self.done) + ("" if self.unit == "bytes" else f" {self.unit}")
            return f"{counted}, {speed}" if speed else counted
        text = f"{self._count(self.done)}/{self._count(self.total)} ({_percent(self.done, self.total)}%)"
        text += f" {speed}" if speed else ""
        if self.done >= self.total:
            return f"{text}, {duration(elapsed)}"
        return f"{text}, ETA {duration((self.total - self.done) / rate)}" if rate > 0 else text

    def _count(self, n: float) -> str:
        return _bytes(n) if self.unit == "bytes" else f"{n:,.0f}"

    def _rate(self, rate: float) -> str:
        if self.unit == "bytes":
            return f"{_bytes(rate)}/s"
        return f"{rate:,.0f} {self.unit}/s" if rate >= 100 else f"{rate:.3g} {self.unit}/s"


class Display:
    """A `ProgressFn` for one command: a bar per phase on a terminal (on stderr, gone at the end), plain lines
    otherwise: one every `interval` seconds (default: $VMOE_PROGRESS_INTERVAL or 10 s) and its last (none for a
    phase over within a second). Use it as a context manager; nothing is drawn before the first call, so an early
    error stays one line."""

    def __init__(self, console: Console | None = None, interval: float | None = None):
        self.console = console or Console(stderr=True)
        self.interval = interval if interval is not None else _interval_from_env()
        self.phases: dict[str, Phase] = {}
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, what: str, done: int, total: int | None, unit: str = "images") -> None:
        now = time.monotonic()
        phase = self.phases.get(what)
        if phase is None or done < phase.done:  # a new phase, or the same pass run again
            phase = self.phases[what] = Phase(total, unit, done, now, done)
        phase.done, phase.total = done, total
        if self.console.is_terminal:
            self._draw(what, phase)
        elif total is not None and done >= total:
            if not phase.finished and _worth_a_line(phase, now):
                self._line(what, phase, now)
            phase.finished = True
        elif now - max(phase.shown, phase.start) >= self.interval:
            self._line(what, phase, now)

    def echo(self, line: str) -> None:
        """One line on stderr: above the bars on a terminal, plain and flushed otherwise."""
        if self._bars is not None:
            self._bars.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.console.file, flush=True)

    def close(self, interrupted: bool = False) -> None:
        """Remove the bars; without a terminal, a final line for each phase that did not reach its total
        (unless `interrupted`: an error then stays the last line)."""
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
        if interrupted or self.console.is_terminal:
            return
        now = time.monotonic()
        for what, phase in self.phases.items():
            if not phase.finished and phase.shown_done != phase.done and _worth_a_line(phase, now):
                phase.finished = True
                self._line(what, phase, now)

    def __enter__(self) -> Display:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        self.close(interrupted=kind is not None)

    def _line(self, what: str, phase: Phase, now: float) -> None:
        phase.shown, phase.shown_done = now, phase.done
        self.echo(f"{what}: {phase.status(now)}")

    def _draw(self, what: str, phase: Phase) -> None:
        if self._bars is None:
            self._bars = Progress("{task.description}", BarColumn(), _Status(), console=self.console, transient=True)
            self._bars.start()
        if what not in self._tasks:
            self._tasks[what] = self._bars.add_task(what, total=phase.total)
        self._bars.update(self._tasks[what], completed=phase.done, total=phase.total, phase=phase)


class _Status(ProgressColumn):
    """The bar's counts, rate and ETA: the same text as a plain line."""

    def render(self, task: Task) -> Text:
        phase = task.fields.get("phase")
        return Text(phase.status(time.monotonic()) if phase else "")


def _worth_a_line(phase: Phase, now: float) -> bool:
    """A phase's last plain line: when it showed an earlier one or took a second or more; a log keeps no line of
    a phase that was over at once (nor does it come between a command and its one-line error)."""
    return phase.shown_done is not None or now - phase.start >= 1.0


def duration(seconds: float) -> str:
    """`0.4 s`, `7 s`, `3 min 05 s`, `2 h 07 min`."""
    if seconds < 9.95:
        return f"{max(seconds, 0.0):.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _percent(done: int, total: int) -> int:
    """Whole percent, 100 only when done (never rounded up to it)."""
    return 100 if done >= total else min(99, 100 * done // max(total, 1))


def _bytes(n: float) -> str:
    """`812 B`, `4.1 MB`, `1.2 GB` (powers of 1000)."""
    power = 0
    while n >= 1000 and power < 4:
        n, power = n / 1000, power + 1
    return f"{n:,.0f} B" if power == 0 else f"{n:.1f} {'kMGT'[power - 1]}B"


def _interval_from_env() -> float:
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        interval = float(text) if text else INTERVAL_S
    except ValueError:
        interval = -1.0
    if not interval >= 0:
        raise VmoeError(f"${INTERVAL_ENV}: expected the seconds between progress lines, e.g. 10; got {text!r}")
    return interval
