"""The shard writer: a source's images -> WebDataset tars + manifest, in parallel, resumable.

Layout of the output folder (the contract with the loader):

    {split}-{index:06d}.tar   samples `{split}_{n:08d}.{png,jpg,webp}`, `.cls` (decimal label), `.json`
                              ({"id", "label", "label_name"}); n is the position in the split's seeded order
    manifest.json             written last: its presence means the job is complete
    sizes.json                shard file -> sample count (OpenCLIP style)
    skipped.jsonl             one {"id", "reason"} per input that could not be used
    .vmoe-shard/              the job's state, removed once the manifest is written: job.json, the plan
                              (`data/plan.py`) and done/, one record per finished shard

The plan (which samples go to which shard, under which key) is a pure function of the source listing
and `ShardOptions`. It is made once per job and kept in the state folder, so a rerun after a crash lists
nothing again, keeps the shards recorded as complete, and writes only the rest. Each shard is one task: read
its rows from the plan, then read, validate and encode its images, write `{file}.{pid}.tmp`, rename it, then
record it in `.vmoe-shard/done/`; a task that fails (a full disk) removes its temp file, and a job stopped by an
error or Ctrl-C removes those of its other tasks. A bad image leaves its shard one sample short; it never moves
another sample to a different shard or key. Images are stored as 8-bit grey or RGB: 16-bit, float, alpha, CMYK
and the rest as `pixels.py` says; images stored as they are, checked as `validate.py` says. Pool workers are
spawned (they inherit nothing of the listing) and die with the main process, kill -9 included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import queue
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vmoe_cli.atomic import write_text_atomic
from vmoe_cli.data.manifest import FORMAT, MANIFEST, STATE_DIR, read_manifest
from vmoe_cli.data.pixels import UnsupportedImage, is_plain, to_8bit
from vmoe_cli.data.plan import SPLITS, Plan, ProgressFn, ShardOptions, build_plan, load_plan
from vmoe_cli.data.sources import ArrayItem, Item, Source, open_source
from vmoe_cli.data.validate import BadImage, check_kept, decode, open_image
from vmoe_cli.data.workers import exit_if_orphaned, spawn_pool
from vmoe_cli.errors import VmoeError

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> extension whose bytes we keep
EVAL_TEST_FRACTION = 0.2  # test hold-out when an evaluation command shards a source that has no test split
TICK_EVERY = 64  # samples between progress reports from a shard task
RERUN = "free space or fix the folder, then rerun the same command (finished shards are kept)"
ANOTHER = "pass --overwrite or another --out"


@dataclass(frozen=True)
class ShardTask:
    """One shard of the plan: samples `first` to `end` of its split's order (keys `first`...), in `file`."""

    split: str
    file: str
    first: int
    end: int
    digest: str  # sha256 of what this shard must contain, so a rerun can tell a finished shard from a stale one


@dataclass(frozen=True)
class _Writer:
    """What every shard task needs; a pool worker gets it once, at its start."""

    plan: Plan
    options: ShardOptions
    classes: list[str]
    out: Path | None  # None: validate only (a dry run)


def write_shards(
    source: Source,
    out_dir: str | Path,
    options: ShardOptions,
    *,
    workers: int = 1,
    overwrite: bool = False,
    max_skipped: float | None = None,
    dry_run: bool = False,
    plan_only: bool = False,
    progress: ProgressFn | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Shard `source` into `out_dir` and return the manifest (see the module docstring for the layout).

    Resumes an interrupted run of the same job (`say` is told how far it had come); refuses a different job in
    a non-empty folder unless `overwrite`. `plan_only` lists and plans, keeps the plan in the state folder for
    the run that writes the shards, reads no image, and returns the would-be manifest with planned counts.
    `dry_run` writes nothing (the plan goes to a temporary folder); without `plan_only` it reads and validates
    every input and returns the would-be manifest (no bytes or sha256) with the skipped inputs under
    "skipped_inputs". `progress(phase, done, total)` reports the phases "listing", "planning" and "writing".
    Raises VmoeError when no sample is usable or more than `max_skipped` (a fraction) of the inputs were skipped.
    """
    options.check()
    if workers < 1:
        raise VmoeError(f"--workers must be at least 1, got {workers}")
    job = {"format": FORMAT, "source": source.spec, "options": dataclasses.asdict(options)}
    job = json.loads(json.dumps({**job, "classes": source.class_names}))  # as in a JSON file: comparisons are exact
    if dry_run:
        with tempfile.TemporaryDirectory(prefix="vmoe-plan-") as tmp:
            plan = build_plan(source, options, Path(tmp) / "plan", progress)
            job["classes"] = _class_names(source, plan)
            tasks = _tasks(plan, job)
            if plan_only:
                return _manifest(job, tasks, _planned(tasks))
            writer = _Writer(plan, options, job["classes"], None)
            return _write_all(writer, tasks, {}, job, workers, max_skipped, progress, None)
    out = Path(out_dir)
    previous = _prepare(out, job, overwrite)
    if previous is not None and (out / MANIFEST).is_file():
        return previous
    folder = out / STATE_DIR / "plan"
    plan = load_plan(folder, source)
    resumed = plan is not None  # a previous run planned (and perhaps wrote part of) this job
    plan = plan or build_plan(source, options, folder, progress)
    job["classes"] = _class_names(source, plan)
    if previous is not None and previous.get("classes") not in (None, job["classes"]):
        raise VmoeError(f"{out}: holds shards of a different job ({_difference(previous, job)}); {ANOTHER}")
    _write_json(out / STATE_DIR / "job.json", job)
    tasks = _tasks(plan, job)
    records = {task.file: r for task in tasks if (r := _finished_record(out, task)) is not None}
    if plan_only:
        return _manifest(job, tasks, {**_planned(tasks), **records})
    writer = _Writer(plan, options, job["classes"], out)
    manifest = _write_all(writer, tasks, records, job, workers, max_skipped, progress, say if resumed else None)
    _write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest


def _inputs(tasks: list[ShardTask]) -> int:
    """Inputs planned into `tasks` (samples, before any is skipped)."""
    return sum(task.end - task.first for task in tasks)


def eval_shards(spec: str, cache_dir: str | Path, workers: int = 1) -> Path:
    """Shards with train and test splits for an evaluation command's DATA argument.

    `spec` is a shard directory (used as it is) or any source `vmoe shard` accepts, sharded once into
    `cache_dir/shards/` under a key of its listing (with a seeded 20% test hold-out when it has no test split).
    """
    path = Path(spec)
    if (path / MANIFEST).is_file() or (path / STATE_DIR).is_dir():
        read_manifest(path)  # unfinished shards: one line naming the command to rerun
        return path
    source = open_source(spec)
    with tempfile.TemporaryDirectory(prefix="vmoe-plan-") as tmp:
        listing = build_plan(source, ShardOptions(), Path(tmp) / "plan")
    options = ShardOptions(test=0.0 if listing.listed["test"] else EVAL_TEST_FRACTION)
    key = hashlib.sha256(json.dumps([source.spec, listing.digest, dataclasses.asdict(options)]).encode()).hexdigest()
    out = Path(cache_dir) / "shards" / key[:16]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_shards(source, out, options, workers=workers)  # returns at once when a previous call finished it
    return out


def encode_image(item: Item, options: ShardOptions) -> tuple[bytes, str]:
    """The bytes and extension stored for `item`; raises BadImage with the reason when it is unusable.

    Every stored image decodes, by a plain Pillow `convert`, to the 8-bit pixels of `pixels.to_8bit` (what a
    viewer shows), whoever reads it: `keep` keeps the input's bytes only when they already do (`is_plain`:
    8 bits, no alpha, no transparent colour), checked as `options.validate` says; other images are decoded and
    converted (under `keep`, stored as PNG).
    """
    raw, image = _open(item)
    shrink = options.resize is not None and min(image.size) > options.resize
    kept = image.format in KEPT_FORMATS and is_plain(image)
    if options.encoding == "keep" and raw is not None and not shrink and kept:
        check_kept(raw, image, options.validate)
        return raw, KEPT_FORMATS[image.format]
    decode(image)
    ext = options.encoding if options.encoding != "keep" else ("jpg" if image.format == "JPEG" else "png")
    try:
        image = to_8bit(image)
    except UnsupportedImage as e:
        raise BadImage(str(e)) from None
    if shrink:
        scale = options.resize / min(image.size)
        size = tuple(options.resize if s == min(image.size) else max(1, round(s * scale)) for s in image.size)
        image = image.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if ext == "jpg":
        image.save(buffer, format="JPEG", quality=options.quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue(), ext


class _Report:
    """Counts processed inputs and passes ("writing", done, total) to the caller's progress function."""

    def __init__(self, progress: ProgressFn | None, done: int, total: int) -> None:
        self.progress, self.done, self.total = progress, done, total

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress("writing", self.done, self.total)


def _class_names(source: Source, plan: Plan) -> list[str]:
    """The job's class names: the source's, or `--class-names` (as many)."""
    if source.class_names is None:
        return plan.classes
    if len(source.class_names) != len(plan.classes):
        raise VmoeError(
            f"--class-names: {source.spec} has {len(plan.classes)} classes, got {len(source.class_names)} names"
        )
    return source.class_names


def _tasks(plan: Plan, job: dict[str, Any]) -> list[ShardTask]:
    """The plan's shards, in manifest order, each with the digest of its content."""
    tasks, job_digest = [], hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
    for split in (s for s in SPLITS if s in plan.bounds):
        bounds = plan.bounds[split]
        for index, (first, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            file = f"{split}-{index:06d}.tar"
            content = json.dumps([job_digest, plan.digest, file, first, end]).encode()
            tasks.append(ShardTask(split, file, first, end, hashlib.sha256(content).hexdigest()))
    return tasks


def _planned(tasks: list[ShardTask]) -> dict[str, dict[str, Any]]:
    """Records of shards not yet written: their planned counts, no bytes, no class counts."""
    return {
        t.file: {"file": t.file, "count": t.end - t.first, "bytes": None, "sha256": None, "class_counts": {},
                 "skipped": []}
        for t in tasks
    }  # fmt: skip


def _write_all(
    writer: _Writer,
    tasks: list[ShardTask],
    records: dict[str, dict[str, Any]],
    job: dict[str, Any],
    workers: int,
    max_skipped: float | None,
    progress: ProgressFn | None,
    say: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Write (or, without an output folder, validate) the shards not in `records`, telling `say` how many are
    already written; the manifest of all of them, with sizes.json and skipped.jsonl written beside the shards,
    checked against `max_skipped`."""
    todo = [task for task in tasks if task.file not in records]
    if todo and say is not None:
        say(f"resuming: {len(records)} of {len(tasks)} shards already written")
    total = _inputs(tasks)
    report = _Report(progress, total - _inputs(todo), total)
    if workers == 1 or len(todo) <= 1:
        report(0)
        records = {**records, **{task.file: _write_shard(task, writer, report) for task in todo}}
    else:
        records = {**records, **_run_pool(todo, writer, workers, report)}
    manifest = _manifest(job, tasks, records)
    skipped = [entry for task in tasks for entry in records[task.file]["skipped"]]
    if writer.out is None:
        manifest["report"], manifest["skipped_inputs"] = None, skipped
    else:
        shards = [shard for split in manifest["splits"].values() for shard in split["shards"]]
        _write_json(writer.out / "sizes.json", {shard["file"]: shard["count"] for shard in shards})
        _write_text(writer.out / "skipped.jsonl", "".join(json.dumps(entry) + "\n" for entry in skipped))
    _check_skipped(len(skipped), total, max_skipped, writer.out)
    return manifest


def _prepare(out: Path, job: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Make `out` ready for `job`; return the previous run's job (its manifest when it finished), or None."""
    if out.exists() and not out.is_dir():
        raise VmoeError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VmoeError(f"{out}: cannot create ({e.strerror})") from None
    previous = None
    if overwrite:
        _clear(out)
    elif any(out.iterdir()):
        manifest, job_file = out / MANIFEST, out / STATE_DIR / "job.json"
        previous = _read_json(manifest) if manifest.is_file() else _read_json(job_file) if job_file.is_file() else None
        if not isinstance(previous, dict):
            raise VmoeError(f"{out}: not empty and not written by `vmoe shard` (choose an empty --out, or --overwrite)")
        difference = _difference(previous, job)
        if difference:
            raise VmoeError(f"{out}: holds shards of a different job ({difference}); {ANOTHER}")
        if manifest.is_file():
            return previous
    (out / STATE_DIR / "done").mkdir(parents=True, exist_ok=True)
    if previous is None:
        _write_json(out / STATE_DIR / "job.json", job)  # marks the folder as this job's before the listing
    for stale in [*out.glob("*.tmp"), *(out / STATE_DIR).glob("plan.tmp-*")]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    return previous


def _clear(out: Path) -> None:
    """Delete what `vmoe shard` writes (shards, temp files, manifest, sizes, report, state); nothing else."""
    for path in [*out.glob("*.tar"), *out.glob("*.tmp")]:
        path.unlink()
    for name in (MANIFEST, "sizes.json", "skipped.jsonl"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _difference(previous: dict[str, Any], job: dict[str, Any]) -> str:
    """The first way `previous` differs from `job`, in words; '' when they are the same job. Class names are
    compared only when both are known (a job's are known once it is planned, or given by --class-names)."""
    for key in ("format", "source", "classes"):
        if previous.get(key) != job[key] and (key != "classes" or None not in (previous.get(key), job[key])):
            return f"{key} was {previous.get(key)!r}, now {job[key]!r}"
    old = previous.get("options", {})
    for key, value in job["options"].items():
        if old.get(key) != value:
            return f"--{key.replace('_', '-')} was {old.get(key)!r}, now {value!r}"
    return ""


def _finished_record(out: Path, task: ShardTask) -> dict[str, Any] | None:
    """The record of a shard finished by an earlier run of this job, or None when it must be (re)written."""
    path = out / STATE_DIR / "done" / f"{task.file}.json"
    try:
        record = json.loads(path.read_text())
        complete = record["digest"] == task.digest and (out / task.file).stat().st_size == record["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if complete else None


def _write_shard(task: ShardTask, writer: _Writer, tick: Callable[[int], None]) -> dict[str, Any]:
    """Write one shard (or, with no output folder, only validate its inputs) and return its record.

    The tar goes to `{file}.{pid}.tmp`, renamed once complete; whatever stops it (a full disk, Ctrl-C) removes
    the temp file, so a failed job leaves only finished shards behind.
    """
    out = writer.out
    tmp = None if out is None else out / f"{task.file}.{os.getpid()}.tmp"
    items = writer.plan.items(task.split, task.first, task.end)
    try:
        with open(tmp or os.devnull, "wb") as f:
            hashed = _Hashed(f)
            record = _write_tar(task, items, writer, hashed, tick)
            if tmp is not None:
                f.flush()
                os.fsync(f.fileno())
        if tmp is not None:
            record.update(bytes=hashed.size, sha256=hashed.sha256.hexdigest(), digest=task.digest)
            os.replace(tmp, out / task.file)
            _write_json(out / STATE_DIR / "done" / f"{task.file}.json", record)
    except OSError as e:
        where = task.file if out is None else out / task.file
        raise VmoeError(f"{where}: cannot write ({e.strerror or e}); {RERUN}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # already renamed unless something failed
    return record


class _Hashed:
    """A file being written, with the sha256 and size of what was written (so the tar is not read again)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def _write_tar(
    task: ShardTask, items: list[Item], writer: _Writer, f: _Hashed, tick: Callable[[int], None]
) -> dict[str, Any]:
    """Encode `items` (the task's samples) as a tar into `f`; the shard's record without bytes and sha256."""
    count, class_counts, skipped, pending = 0, Counter(), [], 0
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for n, item in enumerate(items, task.first):
            pending += 1
            if pending == TICK_EVERY:
                tick(pending)
                pending = 0
            try:
                data, ext = encode_image(item, writer.options)
            except BadImage as e:
                skipped.append({"id": item.id, "reason": str(e)})
                continue
            key = f"{task.split}_{n:08d}"
            meta = {"id": item.id, "label": item.label, "label_name": writer.classes[item.label]}
            for suffix, payload in (
                (ext, data),
                ("cls", str(item.label).encode()),
                ("json", json.dumps(meta).encode()),
            ):
                _add_member(tar, f"{key}.{suffix}", payload)
            count += 1
            class_counts[str(item.label)] += 1
    tick(pending)
    record = {"file": task.file, "count": count, "bytes": None, "sha256": None, "class_counts": class_counts}
    return {**record, "skipped": skipped}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one file with fixed metadata (mode 644, mtime 0, no owner), so equal content gives equal bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


_worker: tuple[_Writer, Any, int] | None = None  # in a pool worker: the writer, the progress queue, the parent's pid


def _start_worker(writer: _Writer, progress_queue: Any) -> None:
    """Pool worker setup: keep the writer, the queue and the main process's pid (checked alive) for every task."""
    global _worker
    _worker = (writer, progress_queue, os.getppid())


def _pool_write_shard(task: ShardTask) -> dict[str, Any]:
    writer, progress_queue, parent = _worker

    def tick(n: int) -> None:
        exit_if_orphaned(parent)
        progress_queue.put(n)

    return _write_shard(task, writer, tick)


def _run_pool(
    tasks: list[ShardTask], writer: _Writer, workers: int, report: Callable[[int], None]
) -> dict[str, dict[str, Any]]:
    """Run shard tasks on `workers` spawned processes: each gets the writer (the plan's folder, not its rows) once,
    and a task is a shard's bounds, so no rows or images go through pipes (a big task in flight can hang
    Pool.terminate on Ctrl-C). Spawned, not forked: nothing of this process's memory is copied, and a thread
    (the caller's progress display) running at that moment is harmless."""
    progress_queue = multiprocessing.get_context("spawn").Queue()
    records = {}
    try:
        with spawn_pool(min(workers, len(tasks)), _start_worker, (writer, progress_queue)) as pool:
            report(0)
            pending = [pool.apply_async(_pool_write_shard, (task,)) for task in tasks]
            while pending:
                with contextlib.suppress(queue.Empty):
                    report(progress_queue.get(timeout=0.1))
                ready = [p for p in pending if p.ready()]  # once: a task finishing meanwhile waits for the next turn
                for result in ready:
                    record = result.get()  # re-raises a task's exception here
                    records[record["file"]] = record
                pending = [p for p in pending if p not in ready]
            while not progress_queue.empty():
                report(progress_queue.get())
    except BaseException:
        _remove_temps(writer.out, tasks)  # leaving `with` terminated and joined every worker
        raise
    return records


def _remove_temps(out: Path | None, tasks: list[ShardTask]) -> None:
    """Delete the temp files of `tasks` (any writer's pid) that a stopped pool's killed workers left."""
    if out is None:
        return
    for task in tasks:
        for tmp in out.glob(f"{task.file}.*.tmp"):
            with contextlib.suppress(OSError):  # never hide the error that stopped the job
                tmp.unlink(missing_ok=True)


def _manifest(job: dict[str, Any], tasks: list[ShardTask], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a finished plan: per split counts, class counts and shards (file, count, bytes, sha256)."""
    classes = job["classes"]
    splits: dict[str, Any] = {}
    for task in tasks:
        record = records[task.file]
        split = splits.setdefault(task.split, {"count": 0, "class_counts": Counter(), "shards": []})
        split["count"] += record["count"]
        split["class_counts"].update({classes[int(k)]: v for k, v in record["class_counts"].items()})
        split["shards"].append({k: record[k] for k in ("file", "count", "bytes", "sha256")})
    for split in splits.values():
        split["class_counts"] = {name: split["class_counts"][name] for name in classes}
    skipped = sum(len(records[task.file]["skipped"]) for task in tasks)
    return {**job, "splits": splits, "skipped": skipped, "report": "skipped.jsonl"}


def _check_skipped(skipped: int, total: int, max_skipped: float | None, out: Path | None) -> None:
    """Fail when nothing is usable, or when more than `max_skipped` of the inputs were skipped."""
    see = f"; see {out / 'skipped.jsonl'}" if out is not None else ""
    if skipped == total:
        raise VmoeError(f"no usable image: all {total} inputs were skipped{see}")
    if max_skipped is not None and skipped > max_skipped * total:
        raise VmoeError(f"{skipped} of {total} inputs were skipped, more than --max-skipped {max_skipped:g}{see}")


def _open(item: Item) -> tuple[bytes | None, Image.Image]:
    """The input's raw bytes (None for in-memory images) and its image, opened (header parsed, not decoded)."""
    if isinstance(item, ArrayItem):
        return None, Image.fromarray(item.pixels)
    try:
        raw = item.path.read_bytes()
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL character
        raise BadImage(f"unreadable ({getattr(e, 'strerror', None) or e})") from None
    if not raw:
        raise BadImage("zero-byte file")
    return raw, open_image(raw)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VmoeError(f"{path}: cannot read as JSON ({getattr(e, 'strerror', None) or e})") from None


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1) + "\n")


def _write_text(path: Path, text: str) -> None:
    """`write_text_atomic`, a failure (a full disk) being one line naming the file."""
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise VmoeError(f"{path}: cannot write ({e.strerror or e}); {RERUN}") from None
