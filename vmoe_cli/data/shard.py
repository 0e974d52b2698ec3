"""The shard writer: a source's images -> WebDataset tars + manifest, in parallel, resumable.

Layout of the output folder (the contract with the loader):

    {split}-{index:06d}.tar   samples `{split}_{n:08d}.{png,jpg,webp}`, `.cls` (decimal label), `.json`
                              ({"id", "label", "label_name"}); n is the position in the split's seeded order
    manifest.json             written last: its presence means the job is complete
    sizes.json                shard file -> sample count (OpenCLIP style)
    skipped.jsonl             one {"id", "reason"} per input that could not be used

The plan (which samples go to which shard, under which key) is a pure function of the source listing
and `ShardOptions`, so a rerun after a crash recomputes it, keeps the shards already recorded as
complete, and writes only the rest. Each shard is one task: read, validate and encode its own samples,
write `{file}.{pid}.tmp`, rename it, then record it in `.vmoe-shard/done/`; a task that fails (a full
disk) removes its temp file, and a job stopped by an error or Ctrl-C removes those of its other tasks. A
bad image leaves its shard one sample short; it never moves another sample to a different shard or key.
Images are stored as 8-bit grey or RGB: 16-bit, float, alpha, CMYK and the rest as `pixels.py` says.
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
import signal
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vmoe_cli.atomic import write_text_atomic
from vmoe_cli.data.manifest import FORMAT, MANIFEST, STATE_DIR, file_sha256, read_manifest
from vmoe_cli.data.pixels import UnsupportedImage, is_plain, to_8bit
from vmoe_cli.data.sources import ArrayItem, Item, Source, open_source
from vmoe_cli.errors import VmoeError

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> extension whose bytes we keep
ENCODINGS = ("keep", "png", "jpg")
SPLITS = ("train", "minival", "test")  # in manifest order
EVAL_TEST_FRACTION = 0.2  # test hold-out when an evaluation command shards a source that has no test split
TICK_EVERY = 64  # samples between progress reports from a shard task
RERUN = "free space or fix the folder, then rerun the same command (finished shards are kept)"

ProgressFn = Callable[[int, int], None]  # (inputs processed, inputs planned)


@dataclass(frozen=True)
class ShardOptions:
    """Every option that decides the shards' content; recorded in the manifest."""

    encoding: str = "keep"  # "keep" 8-bit JPEG/PNG/WebP bytes (others become PNG), or re-encode: "png", "jpg"
    quality: int = 95  # JPEG quality when encoding to jpg (also when "keep" must re-encode a resized JPEG)
    resize: int | None = None  # shrink so the shorter side is this many pixels; smaller images are left alone
    shard_size: int = 5000  # most samples per shard
    shard_bytes: int | None = None  # most bytes per shard, planned from input sizes (exact when bytes are kept)
    seed: int = 0  # decides the order of samples in each split and which train samples go to minival
    minival: float = 0.0  # fraction of train held out as the 'minival' split
    test: float = 0.0  # fraction of train held out as the 'test' split, for sources without one (digits)
    limit: int | None = None  # keep only the first N samples of each split (after the seeded shuffle)

    def validate(self) -> None:
        """Raise VmoeError naming the option when a value is impossible."""
        if self.encoding not in ENCODINGS:
            raise VmoeError(f"--encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        checks = [
            ("quality", 1 <= self.quality <= 100, "between 1 and 100"),
            ("resize", self.resize is None or self.resize >= 1, "at least 1"),
            ("shard-size", self.shard_size >= 1, "at least 1"),
            ("shard-bytes", self.shard_bytes is None or self.shard_bytes >= 1, "at least 1"),
            ("seed", self.seed >= 0, "0 or more"),
            ("minival", 0.0 <= self.minival < 1.0, "in [0, 1)"),
            ("test", 0.0 <= self.test < 1.0, "in [0, 1)"),
            ("limit", self.limit is None or self.limit >= 1, "at least 1"),
        ]
        for name, ok, wanted in checks:
            if not ok:
                raise VmoeError(f"--{name} must be {wanted}, got {getattr(self, name.replace('-', '_'))}")


@dataclass(frozen=True)
class ShardTask:
    """One shard of the plan: its file and the samples it holds, the first under key number `first`."""

    split: str
    file: str
    first: int
    items: tuple[Item, ...]

    def digest(self, job: dict[str, Any]) -> str:
        """sha256 of what this shard must contain, so a rerun can tell a finished shard from a stale one."""
        content = [job, self.file, self.first, [(item.id, item.label) for item in self.items]]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class BadImage(Exception):
    """An input that cannot be used; the message is the reason written to skipped.jsonl."""


def split_orders(source: Source, options: ShardOptions) -> dict[str, list[Item]]:
    """Each split's items in their final order: seeded shuffle, test then minival held out of train, --limit.

    A test hold-out is refused when the source has its own test split, so a test set is never mixed.
    """
    if options.test > 0 and source.splits.get("test"):
        raise VmoeError(f"--test: {source.spec} has its own test split; drop --test")
    orders = {}
    for i, split in enumerate(("train", "test")):
        items = source.splits.get(split, [])
        orders[split] = [items[j] for j in np.random.default_rng([options.seed, i]).permutation(len(items))]
    for split, fraction in (("test", options.test), ("minival", options.minival)):
        train = orders["train"]
        if fraction > 0 and train:
            held = min(len(train), max(1, round(fraction * len(source.splits["train"]))))
            orders[split], orders["train"] = train[:held], train[held:]
    return {split: orders[split][: options.limit] for split in SPLITS if orders.get(split)}


def plan_shards(source: Source, options: ShardOptions) -> list[ShardTask]:
    """Cut each split's order into shards of at most `shard_size` samples and (estimated) `shard_bytes`."""
    tasks = []
    for split, items in split_orders(source, options).items():
        start, index = 0, 0
        while start < len(items):
            end, size = start, 1024  # a tar ends with two zero blocks, then pads to a whole record
            while end < len(items) and end - start < options.shard_size:
                if options.shard_bytes is not None:
                    size += _estimated_tar_bytes(items[end])
                    if end > start and -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE > options.shard_bytes:
                        break
                end += 1
            tasks.append(ShardTask(split, f"{split}-{index:06d}.tar", start, tuple(items[start:end])))
            start, index = end, index + 1
    return tasks


def write_shards(
    source: Source,
    out_dir: str | Path,
    options: ShardOptions,
    *,
    workers: int = 1,
    overwrite: bool = False,
    max_skipped: float | None = None,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Shard `source` into `out_dir` and return the manifest (see the module docstring for the layout).

    Resumes an interrupted run of the same job; refuses a different job in a non-empty folder unless
    `overwrite`. `dry_run` reads and validates every input, writes nothing and returns the would-be
    manifest (no bytes or sha256) with the skipped inputs under "skipped_inputs". Raises VmoeError when
    no sample is usable or more than `max_skipped` (a fraction) of the inputs were skipped.
    """
    options.validate()
    if workers < 1:
        raise VmoeError(f"--workers must be at least 1, got {workers}")
    job = {"format": FORMAT, "source": source.spec, "options": dataclasses.asdict(options), "classes": source.classes}
    job = json.loads(json.dumps(job))  # the form it takes in a JSON file, so comparisons are exact
    tasks = plan_shards(source, options)
    out = None if dry_run else Path(out_dir)
    records: dict[str, dict[str, Any]] = {}
    if out is not None:
        finished = _prepare(out, job, overwrite)
        if finished is not None:
            return finished
        for task in tasks:
            record = _finished_record(out, task, job)
            if record is not None:
                records[task.file] = record
    todo = [task for task in tasks if task.file not in records]
    total = sum(len(task.items) for task in tasks)
    done = total - sum(len(task.items) for task in todo)
    report = _Report(progress, done, total)
    args = (options, source.classes, job, out)
    if workers == 1 or len(todo) <= 1:
        report(0)
        for task in todo:
            records[task.file] = _write_shard(task, *args, tick=report)
    else:
        records.update(_run_pool(todo, args, workers, report))
    manifest = _manifest(job, tasks, records)
    skipped = [entry for task in tasks for entry in records[task.file]["skipped"]]
    if out is None:
        manifest["report"], manifest["skipped_inputs"] = None, skipped
    else:
        _write_json(
            out / "sizes.json",
            {shard["file"]: shard["count"] for s in manifest["splits"].values() for shard in s["shards"]},
        )
        _write_text(out / "skipped.jsonl", "".join(json.dumps(entry) + "\n" for entry in skipped))
    _check_skipped(len(skipped), total, max_skipped, out)
    if out is not None:
        _write_json(out / MANIFEST, manifest)
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest


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
    options = ShardOptions(test=0.0 if source.splits.get("test") else EVAL_TEST_FRACTION)
    listing = [[split, item.id, item.label] for split, items in source.splits.items() for item in items]
    key = hashlib.sha256(json.dumps([source.spec, listing, dataclasses.asdict(options)]).encode()).hexdigest()
    out = Path(cache_dir) / "shards" / key[:16]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_shards(source, out, options, workers=workers)  # returns at once when a previous call finished it
    return out


def encode_image(item: Item, options: ShardOptions) -> tuple[bytes, str]:
    """The bytes and extension stored for `item`; raises BadImage with the reason when it is unusable.

    Every stored image decodes, by a plain Pillow `convert`, to the 8-bit pixels of `pixels.to_8bit` (what a
    viewer shows), whoever reads it: `keep` keeps the input's bytes only when they already do (`is_plain`:
    8 bits, no alpha, no transparent colour); other images are converted (under `keep`, stored as PNG).
    """
    raw, image = _load(item)
    shrink = options.resize is not None and min(image.size) > options.resize
    kept = image.format in KEPT_FORMATS and is_plain(image)
    if options.encoding == "keep" and raw is not None and not shrink and kept:
        return raw, KEPT_FORMATS[image.format]
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
    """Counts processed inputs and passes (done, total) to the caller's progress function."""

    def __init__(self, progress: ProgressFn | None, done: int, total: int) -> None:
        self.progress, self.done, self.total = progress, done, total

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


def _estimated_tar_bytes(item: Item) -> int:
    """Tar bytes of one sample: 3 headers + padded image, .cls and .json; the image at its input size."""
    if isinstance(item, ArrayItem):
        size = item.pixels.size
    else:
        try:
            size = item.path.stat().st_size
        except OSError:
            size = 0  # it will be skipped
    return 3 * 512 + -(-size // 512) * 512 + 2 * 512


def _prepare(out: Path, job: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Make `out` ready for `job`; return the manifest when the same job already finished there."""
    if out.exists() and not out.is_dir():
        raise VmoeError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VmoeError(f"{out}: cannot create ({e.strerror})") from None
    if overwrite:
        _clear(out)
    elif any(out.iterdir()):
        manifest, job_file = out / MANIFEST, out / STATE_DIR / "job.json"
        previous = _read_json(manifest) if manifest.is_file() else _read_json(job_file) if job_file.is_file() else None
        if previous is None:
            raise VmoeError(f"{out}: not empty and not written by `vmoe shard` (choose an empty --out, or --overwrite)")
        difference = _difference(previous, job)
        if difference:
            raise VmoeError(f"{out}: holds shards of a different job ({difference}); pass --overwrite or another --out")
        if manifest.is_file():
            return previous
    (out / STATE_DIR / "done").mkdir(parents=True, exist_ok=True)
    _write_json(out / STATE_DIR / "job.json", job)
    for stale in out.glob("*.tmp"):
        stale.unlink(missing_ok=True)
    return None


def _clear(out: Path) -> None:
    """Delete what `vmoe shard` writes (shards, temp files, manifest, sizes, report, state); nothing else."""
    for path in [*out.glob("*.tar"), *out.glob("*.tmp")]:
        path.unlink()
    for name in (MANIFEST, "sizes.json", "skipped.jsonl"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _difference(previous: dict[str, Any], job: dict[str, Any]) -> str:
    """The first way `previous` differs from `job`, in words; '' when they are the same job."""
    for key in ("format", "source", "classes"):
        if previous.get(key) != job[key]:
            return f"{key} was {previous.get(key)!r}, now {job[key]!r}"
    old = previous.get("options", {})
    for key, value in job["options"].items():
        if old.get(key) != value:
            return f"--{key.replace('_', '-')} was {old.get(key)!r}, now {value!r}"
    return ""


def _finished_record(out: Path, task: ShardTask, job: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a shard finished by an earlier run of this job, or None when it must be (re)written."""
    path = out / STATE_DIR / "done" / f"{task.file}.json"
    try:
        record = json.loads(path.read_text())
        complete = record["digest"] == task.digest(job) and (out / task.file).stat().st_size == record["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if complete else None


def _write_shard(
    task: ShardTask,
    options: ShardOptions,
    classes: list[str],
    job: dict[str, Any],
    out: Path | None,
    tick: Callable[[int], None],
) -> dict[str, Any]:
    """Write one shard (or, with `out` None, only validate its inputs) and return its record.

    The tar goes to `{file}.{pid}.tmp`, renamed once complete; whatever stops it (a full disk, Ctrl-C) removes
    the temp file, so a failed job leaves only finished shards behind.
    """
    tmp = None if out is None else out / f"{task.file}.{os.getpid()}.tmp"
    try:
        with open(tmp or os.devnull, "wb") as f:
            record = _write_tar(task, options, classes, f, tick)
            if tmp is not None:
                os.fsync(f.fileno())
        if tmp is not None:
            record["bytes"], record["sha256"], record["digest"] = tmp.stat().st_size, file_sha256(tmp), task.digest(job)
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


def _write_tar(
    task: ShardTask, options: ShardOptions, classes: list[str], f: Any, tick: Callable[[int], None]
) -> dict[str, Any]:
    """Encode `task`'s samples as a tar into the open file `f`; the shard's record without bytes and sha256."""
    count, class_counts, skipped, pending = 0, Counter(), [], 0
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for n, item in enumerate(task.items, task.first):
            pending += 1
            if pending == TICK_EVERY:
                tick(pending)
                pending = 0
            try:
                data, ext = encode_image(item, options)
            except BadImage as e:
                skipped.append({"id": item.id, "reason": str(e)})
                continue
            key = f"{task.split}_{n:08d}"
            meta = {"id": item.id, "label": item.label, "label_name": classes[item.label]}
            for suffix, payload in (
                (ext, data),
                ("cls", str(item.label).encode()),
                ("json", json.dumps(meta).encode()),
            ):
                _add_member(tar, f"{key}.{suffix}", payload)
            count += 1
            class_counts[str(item.label)] += 1
    f.flush()
    tick(pending)
    record = {"file": task.file, "count": count, "bytes": None, "sha256": None, "class_counts": class_counts}
    return {**record, "skipped": skipped}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one file with fixed metadata (mode 644, mtime 0, no owner), so equal content gives equal bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


_forked: tuple[list[ShardTask], tuple[Any, ...], Any] | None = None  # what pool workers inherit: tasks, args, queue


def _ignore_sigint() -> None:
    """Pool worker setup: Ctrl-C is the parent's to handle (it terminates the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _forked_write_shard(index: int) -> dict[str, Any]:
    tasks, args, progress_queue = _forked
    return _write_shard(tasks[index], *args, tick=progress_queue.put)


def _run_pool(
    tasks: list[ShardTask], args: tuple[Any, ...], workers: int, report: Callable[[int], None]
) -> dict[str, dict[str, Any]]:
    """Run shard tasks on `workers` forked processes, and only then start reporting progress.

    Fork: the workers inherit the plan, so a task is a shard number and no images go through pipes
    (a big task in flight can hang Pool.terminate on Ctrl-C). They are forked before the first
    progress report, so before the caller's progress bar starts its thread.
    """
    global _forked
    ctx = multiprocessing.get_context("fork")
    progress_queue = ctx.Queue()
    _forked = (tasks, args, progress_queue)
    records = {}
    try:
        with ctx.Pool(min(workers, len(tasks)), initializer=_ignore_sigint) as pool:
            report(0)
            pending = [pool.apply_async(_forked_write_shard, (i,)) for i in range(len(tasks))]
            while pending:
                with contextlib.suppress(queue.Empty):
                    report(progress_queue.get(timeout=0.1))
                for result in [p for p in pending if p.ready()]:
                    record = result.get()  # re-raises a task's exception here
                    records[record["file"]] = record
                pending = [p for p in pending if not p.ready()]
            while not progress_queue.empty():
                report(progress_queue.get())
    except BaseException:
        _remove_temps(args[3], tasks)  # args[3] is `out`; leaving `with` terminated and joined every worker
        raise
    finally:
        _forked = None
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


def _load(item: Item) -> tuple[bytes | None, Image.Image]:
    """The input's raw bytes (None for in-memory images) and its fully decoded image."""
    if isinstance(item, ArrayItem):
        return None, Image.fromarray(item.pixels)
    try:
        raw = item.path.read_bytes()
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror})") from None
    if not raw:
        raise BadImage("zero-byte file")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except Image.DecompressionBombError:
        raise BadImage("image too large (Pillow's decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"truncated or corrupt image ({e})") from None
    return raw, image


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
