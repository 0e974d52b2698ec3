"""The plan of a shard job, kept on disk: the source's listing and, per split, its seeded order cut into shards.

Planning holds a few bytes per input in numpy arrays, never a Python object per input; the per-input state goes
to files in one folder, written once (a temporary folder renamed into place) and read by every later run of the
job and by the writer's workers, each reading only its own shard's rows:

    plan.json          classes, the listing's digest and counts, the listed files' sizes and times, shard bounds
    ids.bin            every input's id (UTF-8), concatenated in listing order
    ends.i64           int64 per input: where its id ends in ids.bin
    labels.i32         int32 per input: its class index
    split.u8           uint8 per input: its listed split (0 train, 1 test)
    blocks.u32         uint32 per input: its size in 512-byte blocks (with --shard-bytes only)
    pixels.u8          uint8 [inputs, H, W]: the images of in-memory sources (digits, IDX)
    order-{split}.i32  int32 per sample: the rows of the split in their final order

The order: each listed split is shuffled by numpy's generator seeded [seed, 0] (train) or [seed, 1] (test);
test, then minival, are held out from the front of train's order (fractions of the listed train count); --limit
keeps the first N of each split. Shards cut each order into runs of at most shard_size samples and, with
shard_bytes, of at most that many tar bytes as estimated from the input sizes.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import mmap
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vmoe_cli.data.sources import LISTED_SPLITS, ArrayItem, FileItem, Item, Source, SourceRows
from vmoe_cli.data.validate import VALIDATE_MODES
from vmoe_cli.errors import VmoeError

PLAN_FORMAT = "vmoe-plan/1"
SPLITS = ("train", "minival", "test")  # in manifest order
BLOCK_ROWS = 1 << 22  # rows per block when a whole-listing array is processed piecewise
SAMPLE_BLOCKS = 5  # 512-byte blocks of a sample besides its image: 3 tar headers, .cls and .json
ProgressFn = Callable[[str, int, "int | None"], None]  # (phase, done, total or None)


ENCODINGS = ("keep", "png", "jpg")


@dataclass(frozen=True)
class ShardOptions:
    """Every option that decides the shards' content; recorded in the manifest."""

    encoding: str = "keep"  # "keep" 8-bit JPEG/PNG/WebP bytes (others become PNG), or re-encode: "png", "jpg"
    validate: str = "fast"  # how "keep" checks an image it stores as it is: "fast", "full" or "none" (validate.py)
    quality: int = 95  # JPEG quality when encoding to jpg (also when "keep" must re-encode a resized JPEG)
    resize: int | None = None  # shrink so the shorter side is this many pixels; smaller images are left alone
    shard_size: int = 5000  # most samples per shard
    shard_bytes: int | None = None  # most bytes per shard, planned from input sizes (exact when bytes are kept)
    seed: int = 0  # decides the order of samples in each split and which train samples go to minival
    minival: float = 0.0  # fraction of train held out as the 'minival' split
    test: float = 0.0  # fraction of train held out as the 'test' split, for sources without one (digits)
    limit: int | None = None  # keep only the first N samples of each split (after the seeded shuffle)

    def check(self) -> None:
        """Raise VmoeError naming the option when a value is impossible."""
        for name, allowed in (("encoding", ENCODINGS), ("validate", VALIDATE_MODES)):
            if getattr(self, name) not in allowed:
                raise VmoeError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
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
class Plan:
    """A plan folder, opened: what the writer needs, without any per-input state in memory."""

    folder: Path
    base: Path | None  # the folder that file ids are relative to (the source's)
    classes: list[str]  # the source's class names
    digest: str  # sha256 of the listing (ids, splits, labels, classes, pixels)
    rows: int  # inputs listed
    listed: dict[str, int]  # inputs per listed split
    bounds: dict[str, list[int]]  # split -> shard boundaries in its order: [0, ..., samples]
    image_shape: tuple[int, int] | None  # (H, W) of in-memory images; None for files

    def items(self, split: str, start: int, end: int) -> list[Item]:
        """Samples `start` to `end` of `split`'s order, read from the plan's files."""
        rows = np.fromfile(self.folder / f"order-{split}.i32", np.int32, count=end - start, offset=4 * start)
        if len(rows) != end - start or not len(rows) or rows.min() < 0 or rows.max() >= self.rows:
            raise VmoeError(f"{self.folder}: damaged plan; rerun with --overwrite")
        labels = _gather(self.folder / "labels.i32", np.int32, rows)
        if labels.min() < 0 or labels.max() >= len(self.classes):
            raise VmoeError(f"{self.folder}: damaged plan; rerun with --overwrite")
        ends = _gather(self.folder / "ends.i64", np.int64, rows)
        starts = np.where(rows > 0, _gather(self.folder / "ends.i64", np.int64, np.maximum(rows - 1, 0)), 0)
        with open(self.folder / "ids.bin", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            spans = zip(starts.tolist(), ends.tolist(), strict=True)
            ids = [blob[s:e].decode("utf-8", "surrogateescape") for s, e in spans]
        if self.image_shape is None:
            return [FileItem(i, label, self.base / i) for i, label in zip(ids, labels.tolist(), strict=True)]
        pixels = _gather(self.folder / "pixels.u8", np.uint8, rows, self.image_shape)
        return [ArrayItem(i, label, p) for i, label, p in zip(ids, labels.tolist(), pixels, strict=True)]


def load_plan(folder: Path, source: Source) -> Plan | None:
    """The plan in `folder`, or None when there is none, it is damaged, or the files it listed have changed."""
    try:
        info = json.loads((folder / "plan.json").read_text(encoding="utf-8"))
        plan = Plan(
            folder, source.base, info["classes"], info["digest"], info["rows"], info["listed"],
            info["bounds"], tuple(info["image_shape"]) if info["image_shape"] else None,
        )  # fmt: skip
        intact = info["format"] == PLAN_FORMAT and _files_intact(plan)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return plan if intact and info["inputs"] == _fingerprint(source) else None


def build_plan(source: Source, options: ShardOptions, folder: Path, progress: ProgressFn | None = None) -> Plan:
    """List `source` and plan its shards (module docstring) into `folder`, replacing any plan there."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        inputs = _fingerprint(source)  # before listing: a change while listing is seen by the next run
        info = _write_listing(source, tmp, options.shard_bytes is not None, progress or _quiet)
        info["bounds"] = _write_orders(tmp, info, options, progress or _quiet, source.spec)
        info.update(format=PLAN_FORMAT, inputs=inputs)
        _write_file(tmp / "plan.json", lambda f: f.write(json.dumps(info).encode()))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_plan(folder, source) or _unreadable(folder)


def _quiet(what: str, done: int, total: int | None) -> None:
    pass


def _unreadable(folder: Path) -> Plan:
    raise VmoeError(f"{folder}: the plan just written cannot be read back; check the disk and rerun")


def _fingerprint(source: Source) -> list[list[Any]]:
    """[path, size, mtime_ns] of each file whose content is the listing (a list file, IDX files)."""
    stats = [(path, path.stat()) for path in source.files()]
    return [[str(path), stat.st_size, stat.st_mtime_ns] for path, stat in stats]


def _write_listing(source: Source, folder: Path, sizes: bool, progress: ProgressFn) -> dict[str, Any]:
    """Stream `source`'s rows into the listing files; return plan.json's listing fields."""
    rows, digest, count, end, shape = SourceRows(source, sizes), hashlib.sha256(), 0, 0, None
    names = ["ids.bin", "ends.i64", "codes.i32", "split.u8", *(["blocks.u32"] if sizes else []), "pixels.u8"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_no_cycle_collection())
        files = {name: stack.enter_context(open(folder / name, "wb")) for name in names}
        for chunk in rows:
            blob, lengths = _encode(chunk.ids)
            ends = end + np.cumsum(lengths)
            end = int(ends[-1]) if len(ends) else end
            parts = {"ids.bin": blob, "ends.i64": ends, "codes.i32": chunk.label, "split.u8": chunk.split}
            parts.update({"blocks.u32": chunk.blocks} if sizes else {})
            if chunk.pixels is not None:
                shape = _same_shape(source, shape, chunk.pixels.shape[1:])
                parts["pixels.u8"] = np.ascontiguousarray(chunk.pixels)
            for name, data in parts.items():
                data = data if isinstance(data, bytes) else data.tobytes()
                files[name].write(data)
                digest.update(data)
            count += len(chunk.ids)
            progress("listing", count, None)
        progress("listing", count, count)  # the total is known now: the phase is over
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    digest.update(json.dumps(rows.classes).encode() + rows.remap.tobytes())
    _write_labels(folder, rows.remap)
    listed = np.bincount(np.fromfile(folder / "split.u8", np.uint8), minlength=len(LISTED_SPLITS))
    return {
        "classes": rows.classes, "digest": digest.hexdigest(), "rows": count,
        "listed": dict(zip(LISTED_SPLITS, listed.tolist(), strict=True)), "image_shape": shape,
    }  # fmt: skip


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Listing makes millions of short-lived lists and no reference cycles: with the collector on, each of its
    full passes would also walk every object of the process (torch's, in the `vmoe` command), doubling the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _encode(ids: list[str]) -> tuple[bytes, np.ndarray]:
    """The ids concatenated as UTF-8 (undecodable file names as they are), and each one's length in bytes."""
    blob = "".join(ids).encode("utf-8", "surrogateescape")
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    if len(blob) != int(lengths.sum()):  # some id is not ASCII: its bytes outnumber its characters
        encoded = [i.encode("utf-8", "surrogateescape") for i in ids]
        lengths = np.fromiter(map(len, encoded), np.int64, len(ids))
    return blob, lengths


def _same_shape(source: Source, shape: list[int] | None, new: tuple[int, ...]) -> list[int]:
    if shape is not None and list(new) != shape:
        raise VmoeError(f"{source.spec}: images of {tuple(shape)} and {new} pixels in one source; shard them apart")
    return list(new)


def _write_labels(folder: Path, remap: np.ndarray) -> None:
    """labels.i32 from the label codes: each code's class index, piece by piece."""
    codes = folder / "codes.i32"
    if np.array_equal(remap, np.arange(len(remap))):
        os.replace(codes, folder / "labels.i32")
        return

    def remapped(f: BinaryIO) -> None:
        with open(codes, "rb") as source:
            while piece := source.read(4 * BLOCK_ROWS):
                f.write(remap[np.frombuffer(piece, np.int32)].tobytes())

    _write_file(folder / "labels.i32", remapped)
    codes.unlink()


def _write_orders(
    folder: Path, info: dict[str, Any], options: ShardOptions, progress: ProgressFn, spec: str
) -> dict[str, list[int]]:
    """Each split's final order into order-{split}.i32 (module docstring); return each split's shard bounds."""
    if options.test > 0 and info["listed"]["test"]:
        raise VmoeError(f"--test: {spec} has its own test split; drop --test")
    split = np.fromfile(folder / "split.u8", np.uint8)
    orders = {}
    for code, name in enumerate(LISTED_SPLITS):
        orders[name] = _positions(split, code)
        np.random.default_rng([options.seed, code]).shuffle(orders[name])  # == rows[rng.permutation(len(rows))]
    del split
    train = orders["train"]
    for name, fraction in (("test", options.test), ("minival", options.minival)):
        if fraction > 0 and len(train):
            held = min(len(train), max(1, round(fraction * info["listed"]["train"])))
            orders[name], train = train[:held], train[held:]
    orders["train"] = train
    blocks = np.fromfile(folder / "blocks.u32", np.uint32) if options.shard_bytes is not None else None
    bounds, planned = {}, 0
    for name in SPLITS:
        order = orders.get(name, train[:0])[: options.limit]
        if len(order):
            _write_file(folder / f"order-{name}.i32", order.tofile)
            bounds[name] = _bounds(order, blocks, options)
            planned += len(order)
            progress("planning", planned, info["rows"])
    return bounds


def _positions(split: np.ndarray, code: int) -> np.ndarray:
    """int32 positions of the rows listed in split `code`, in listing order, found piece by piece."""
    if len(split) and split.min() == split.max():
        return np.arange(len(split) if split[0] == code else 0, dtype=np.int32)
    pieces = [
        np.flatnonzero(split[i : i + BLOCK_ROWS] == code).astype(np.int32) + np.int32(i)
        for i in range(0, len(split), BLOCK_ROWS)
    ]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def _bounds(order: np.ndarray, blocks: np.ndarray | None, options: ShardOptions) -> list[int]:
    """Shard boundaries of one split's order: at most shard_size samples, and with shard_bytes, as many samples
    as fit (a tar ends with 1,024 zero bytes, padded to a 10,240-byte record); always at least one."""
    n, size = len(order), options.shard_size
    if blocks is None:
        return [*range(0, n, size), n]
    room = options.shard_bytes // tarfile.RECORDSIZE * tarfile.RECORDSIZE - 1024
    bounds, start = [0], 0
    while start < n:
        sample_bytes = (blocks[order[start : start + size]].astype(np.int64) + SAMPLE_BLOCKS) * 512
        start += max(1, int(np.searchsorted(np.cumsum(sample_bytes), room, side="right")))
        bounds.append(start)
    return bounds


def _files_intact(plan: Plan) -> bool:
    """Whether the plan's files have the sizes plan.json implies, and its bounds are in order."""
    sizes = {"ends.i64": 8 * plan.rows, "labels.i32": 4 * plan.rows, "split.u8": plan.rows}
    if plan.image_shape is not None:
        sizes["pixels.u8"] = plan.rows * plan.image_shape[0] * plan.image_shape[1]
    for split, bounds in plan.bounds.items():
        if split not in SPLITS or bounds[0] != 0 or any(b >= a for a, b in zip(bounds[1:], bounds[:-1], strict=True)):
            return False
        sizes[f"order-{split}.i32"] = 4 * bounds[-1]
    return (plan.folder / "ids.bin").is_file() and all((plan.folder / f).stat().st_size == n for f, n in sizes.items())


def _gather(path: Path, dtype: type, rows: np.ndarray, shape: tuple[int, ...] = ()) -> np.ndarray:
    """Entries `rows` of a raw array file, mapped only while they are copied (so no mapped page stays resident)."""
    return np.array(np.memmap(path, dtype, mode="r").reshape(-1, *shape)[rows])  # unmapped on return


def _write_file(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Create `path` with `write(f)` and fsync it (the plan folder is renamed into place once complete)."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
