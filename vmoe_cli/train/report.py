"""What a run tells the world: metrics.jsonl lines (rank 0 only) and its progress on stderr (vmoe_cli/progress.py).

Timing fields are kept in their own keys (`TIMING`) so that two runs of the same recipe can be compared
line by line with those keys left out: on CPU with one process everything else is reproducible.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from vmoe_cli.atomic import write_text_atomic
from vmoe_cli.checkpoint import METRICS
from vmoe_cli.errors import VmoeError
from vmoe_cli.progress import Display

TIMING = ("images_per_s", "elapsed_s")  # wall-clock keys: differ between otherwise identical runs


class Reporter:
    """Appends metrics lines and shows them with the steps done, rate and ETA on `display` (rank 0 only)."""

    def __init__(
        self,
        run_dir: Path,
        main: bool,
        total: int,
        start: int,
        tensorboard: bool = False,
        display: Display | None = None,
    ):
        self.path = run_dir / METRICS
        self.main = main
        self.total = total
        self.start_time = time.perf_counter()
        self._last = (start, self.start_time)
        self._display = display if main else None
        self._board = None
        if not main:
            return
        keep_until(self.path, start)  # a resumed run rewrites what came after its checkpoint
        if tensorboard:
            self._board = _summary_writer(run_dir / "tensorboard", start)

    def step(self, step: int) -> None:
        """Show that `step` steps of the run are done."""
        if self._display is not None:
            self._display("training", step, self.total, "steps")

    def train(self, record: dict[str, Any], images_per_step: int) -> None:
        """Write a training line, adding images/s since the previous training line."""
        now = time.perf_counter()
        step, then = self._last
        record["images_per_s"] = (record["step"] - step) * images_per_step / max(now - then, 1e-9)
        record["elapsed_s"] = now - self.start_time
        self._last = (record["step"], now)
        self._write(record)
        self._echo(f"step {record['step']} loss {record['loss']:.4f} lr {record['lr']:.3g} "
                   f"{record['images_per_s']:,.0f} images/s")  # fmt: skip

    def eval(self, record: dict[str, Any]) -> None:
        """Write an evaluation line and show it."""
        self._write(record)
        self._echo(f"step {record['step']} eval top-1 {record['eval_top1']:.4f} "
                   f"({record['eval_correct']}/{record['eval_total']})")  # fmt: skip

    def note(self, line: str) -> None:
        """Show one line (rank 0), e.g. how the run is spread over processes."""
        self._echo(line)

    def close(self) -> None:
        if self._board is not None:
            self._board.close()

    def _write(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._board is not None:
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                for i, v in enumerate(values):
                    if key != "step" and isinstance(v, int | float):
                        self._board.add_scalar(f"{key}/{i}" if isinstance(value, list) else key, v, record["step"])

    def _echo(self, line: str) -> None:
        if not self.main:
            return
        if self._display is not None:
            self._display.echo(line)
        else:
            print(line, file=sys.stderr, flush=True)


def _summary_writer(log_dir: Path, start: int) -> Any:
    """A TensorBoard writer; events after `start` (left by the killed run being resumed) are purged."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise VmoeError("train.tensorboard needs the tensorboard package: pip install 'vmoe[tensorboard]'") from None
    return SummaryWriter(log_dir=str(log_dir), purge_step=start + 1 if start else None)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of a run's metrics file, in order; a line cut short by a kill is skipped (resume drops it too)."""
    records = []
    for line in (run_dir / METRICS).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def keep_until(path: Path, step: int) -> None:
    """Drop the lines of metrics file `path` after `step`, atomically (temp file, then rename)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def _step_of(line: str) -> float:
    """The step of a metrics line; infinity for a line cut short by a kill (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
