"""Read vmoe shards into batches: webdataset tar reading, Pillow decoding, augmentation, normalisation.

Who reads what. Every rank x worker (a "slot") reads its own part of the split, decided from the manifest
alone, so all ranks agree on every count without talking to each other:
  eval       the split in manifest order, cut into one contiguous range per rank (sizes differ by at most
             one); batch j of a rank is formed by worker j % workers, so batches come out in manifest
             order; every sample is decoded exactly once across all ranks x workers; last partial batch
             kept. Ranks may get one batch more than others: reduce eval metrics once at the end.
  train      shard list shuffled with (seed, epoch), the same on every rank, then `shards[rank::world]`,
             then `[worker::workers]`; a shuffle buffer per slot; partial batches dropped.
  resampled  every slot draws shards with replacement, seeded by (seed, epoch, rank, worker); the epoch
             is `epoch_images` long.

With `data.cache` the loader first reads and decodes the whole split once, in the calling process, and keeps
the uint8 pixels in memory for the rest of the process (keyed by each shard's path, size and mtime); workers
then read samples from memory instead of tar files. Samples, order and augmentation are unchanged, so a run
gives the same batches with or without it: the cache removes tar parsing and PNG decoding (most of a worker's
CPU on small images) from every later epoch. It is for splits that fit in RAM (each process holds one copy).

Batches are formed inside the workers and a torch DataLoader (batch_size=None) hands them out round-robin
over workers, skipping a worker once it is exhausted. That order is planned here (`_schedule`), so each
worker knows which of its batches the epoch uses: in training every rank yields the same `steps` batches,
the minimum over ranks (no rank waits forever on a collective), and `start_batch` resumes mid-epoch by
skipping samples before decoding. Augmentation is seeded per sample position, so a resumed epoch yields
exactly the batches an uninterrupted one would have.

Shards are read where the manifest says (data/tars.py): the files of a shard folder, or the paths, URLs and
`pipe:` commands of an index made by `vmoe shard-index`, each as one forward stream. Each shard's size is
checked against the manifest (a local file's when it is opened, a remote one's once read to its end) and its
sample count once read, so a changed shard is a one-line error, never silently other samples (its sha256 is
`vmoe shard-info --verify`'s).

Never pass a Loader through `accelerator.prepare()`: it is already split per rank, and Accelerate would
split the stream a second time and silently lose samples.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vmoe_cli.data import tars
from vmoe_cli.data.augment import augment_image, eval_view
from vmoe_cli.data.config import AugmentConfig, DataConfig
from vmoe_cli.data.manifest import MANIFEST, read_manifest, remedy, shard_location
from vmoe_cli.errors import VmoeError
from vmoe_cli.progress import ProgressFn

SHUFFLE_BUFFER = 1000  # samples (undecoded bytes) held per worker for the within-shard shuffle


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor [C, H, W] (C = 1 grey or 3 RGB), pixels exactly as stored."""
    return _to_tensor(_open(data, channels))


def _open(data: bytes, channels: int) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if img.mode in ("I", "F") or img.mode.startswith("I;"):  # convert() would clip: an all-white image
        raise ValueError(f"{img.mode} image, more than 8 bits: `vmoe shard` stores 8 bits")
    return img.convert("L" if channels == 1 else "RGB")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    array = np.asarray(img, dtype=np.uint8)  # [H, W] or [H, W, C]
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # [C, H, W]


class _Shard(NamedTuple):
    """A shard of the split as the manifest lists it."""

    location: str  # a local path, a URL or a `pipe:` command (data/tars.py)
    count: int  # samples
    size: int  # bytes of the file


@dataclass(frozen=True)
class _Plan:
    """Everything a worker process needs; plain data so it pickles to workers."""

    shard_dir: Path
    shards: list[_Shard]  # of the split, manifest order
    split: str
    label_key: str | None  # None: the label is each sample's .cls; else this key of its .json (an index's choice)
    redo: str  # what to run when a shard no longer matches the manifest
    batch_size: int
    image_size: int
    channels: int
    train: bool
    rank: int
    world_size: int
    processes: int  # DataLoader worker processes; 0 reads in the calling process
    workers: int  # logical workers, max(1, processes): the streams the epoch is split into
    seed: int
    epoch: int
    augment: AugmentConfig
    crop_pct: float | None  # evaluation's centre crop (None: squash)
    resampled: bool
    # filled once the epoch's schedule is known:
    first: list[int] = field(default_factory=list)  # per logical worker: index of its first batch to yield (resume)
    stop: list[int] = field(default_factory=list)  # per logical worker: how many of its batches this epoch uses
    offset: int = 0  # logical worker of DataLoader worker i is (i + offset) % workers
    cache: dict[str, tuple[dict[str, Any], ...]] | None = None  # shard location -> decoded samples; None: the tars


class Loader:
    """Iterable over `(images float32 [B, C, H, W] normalised, labels int64 [B])` for one rank and epoch.

    `steps` is the number of batches in this rank's full epoch (the same on every rank in training);
    iteration yields batches `start_batch .. steps - 1`. With `raw=True` images stay uint8 [B, C, H, W].
    """

    def __init__(self, plan: _Plan, steps: int, start_batch: int, mean: torch.Tensor, std: torch.Tensor, raw: bool):
        self.steps = steps
        self.start_batch = start_batch
        self._plan, self._mean, self._std, self._raw = plan, mean, std, raw

    def __len__(self) -> int:
        return self.steps - self.start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = _Stream(self._plan)
        if self._plan.processes > 0:
            stream = DataLoader(stream, batch_size=None, num_workers=self._plan.processes)
        for n, item in enumerate(stream):
            if isinstance(item, str):  # a worker's VmoeError message, passed as data to keep it one line
                raise VmoeError(item)
            images, labels = item
            if not self._raw:
                images = images.float().div_(255).sub_(self._mean).div_(self._std)  # in place: no temporary batches
            yield images, labels
            if n + 1 == len(self):
                return


def build_loader(
    shard_dir: str | Path,
    split: str,
    data: DataConfig,
    *,
    batch_size: int,
    image_size: int,
    channels: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    raw: bool = False,
    progress: ProgressFn | None = None,
) -> Loader:
    """The loader of `split` for one rank and epoch (see the module docstring for who reads what).

    `data` gives `workers` DataLoader processes (0 reads in this process), `cache` (keep the decoded split
    in memory for later loaders of this process), the normalisation `(x / 255 - mean) / std` per channel and,
    in training only, `augment`, `resampled` and `epoch_images` (eval reads every sample once, resized or
    centre-cropped as `eval_crop_pct` says). `start_batch` resumes an epoch; `raw=True` keeps uint8 pixels;
    `progress` is told how the cache fill goes.
    """
    _check_args(data, batch_size, image_size, channels, rank, world_size)
    manifest = read_manifest(shard_dir)
    splits = manifest["splits"]
    if split not in splits:
        raise VmoeError(f"{shard_dir}: no split {split!r} (has: {', '.join(splits) or 'none'})")
    shards = [_Shard(shard_location(shard_dir, manifest, s), s["count"], s["bytes"]) for s in splits[split]["shards"]]
    plan = _Plan(
        shard_dir=Path(shard_dir), shards=shards, split=split, label_key=manifest.get("label_key"),
        redo=remedy(manifest), batch_size=batch_size, image_size=image_size,
        channels=channels, train=train, rank=rank, world_size=world_size, processes=data.workers,
        workers=max(1, data.workers), seed=seed, epoch=epoch, augment=data.augment, crop_pct=data.eval_crop_pct,
        resampled=train and data.resampled,
    )  # fmt: skip
    schedule = _epoch_schedule(plan, data.epoch_images)
    steps = len(schedule)
    if not 0 <= start_batch <= steps:
        raise VmoeError(f"start_batch {start_batch} is outside this epoch's 0..{steps} batches")
    decoded = _cached_split(shards, split, plan, progress) if data.cache else None
    plan = replace(
        plan, cache=decoded, offset=schedule[start_batch] if start_batch < steps else 0,
        first=[schedule[:start_batch].count(w) for w in range(plan.workers)],
        stop=[schedule.count(w) for w in range(plan.workers)],
    )  # fmt: skip
    return Loader(plan, steps, start_batch, _per_channel(data.mean, channels), _per_channel(data.std, channels), raw)


def _check_args(data: DataConfig, batch_size: int, image_size: int, channels: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or image_size < 1:
        raise VmoeError(f"batch size and image size must be >= 1, got {batch_size} and {image_size}")
    if channels not in (1, 3):
        raise VmoeError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if not 0 <= rank < world_size:
        raise VmoeError(f"rank {rank} is outside 0..{world_size - 1}")
    if data.workers < 0:
        raise VmoeError(f"workers must be >= 0, got {data.workers}")
    data.augment.validate()
    if data.eval_crop_pct is not None and not 0 < data.eval_crop_pct <= 1:
        raise VmoeError(f"data.eval_crop_pct must be in (0, 1] (or null to squash), got {data.eval_crop_pct}")


def _per_channel(value: float | Sequence[float], channels: int) -> torch.Tensor:
    values = [float(value)] * channels if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != channels:
        raise VmoeError(f"mean/std need 1 or {channels} values, got {list(values)}")
    return torch.tensor(values).view(1, channels, 1, 1)


def _epoch_schedule(plan: _Plan, epoch_images: int | None) -> list[int]:
    """The logical worker of each batch of this rank's epoch, from the manifest's counts alone.

    Its length is the epoch's `steps`: in training the same on every rank (the minimum over ranks).
    """
    shards, slots, batch, world = plan.shards, plan.workers, plan.batch_size, plan.world_size
    where = f"{plan.shard_dir}: split {plan.split!r}"
    if plan.resampled:
        steps = (sum(s.count for s in shards) if epoch_images is None else epoch_images) // (batch * world)
        per_worker = [steps // slots + (w < steps % slots) for w in range(slots)]
    elif plan.train:
        if len(shards) < world * slots:
            raise VmoeError(
                f"{where} has {len(shards)} shards, fewer than ranks x workers = {world} x {slots}; "
                "use resampled mode or re-shard with smaller shards"
            )
        order = _shard_order(len(shards), plan.seed, plan.epoch)
        full = [
            [sum(shards[i].count for i in _train_shards(order, r, world, w, slots)) // batch for w in range(slots)]
            for r in range(world)
        ]
        per_worker, steps = full[plan.rank], min(sum(f) for f in full)
    else:
        start, end = _eval_range(sum(s.count for s in shards), plan.rank, world)
        steps = math.ceil((end - start) / batch)
        per_worker = [steps // slots + (w < steps % slots) for w in range(slots)]
    if plan.train and steps == 0:
        raise VmoeError(f"{where} gives no full batch of {batch} per rank; lower the batch size")
    return _schedule(per_worker, steps)


def _shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Shard permutation shared by all ranks: it depends on (seed, epoch) only."""
    order = list(range(num_shards))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def _train_shards(order: list[int], rank: int, world_size: int, worker: int, workers: int) -> list[int]:
    return order[rank::world_size][worker::workers]


def _eval_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """The [start, end) samples of `rank` in manifest order; the ranges of all ranks tile [0, total)."""
    return total * rank // world_size, total * (rank + 1) // world_size


def _schedule(per_worker: list[int], steps: int) -> list[int]:
    """Worker of each batch of the epoch: round-robin, skipping exhausted workers, cut at `steps`.

    This is the order in which torch's DataLoader returns batches of an IterableDataset.
    """
    order: list[int] = []
    for r in range(max(per_worker, default=0)):
        order += [w for w, n in enumerate(per_worker) if r < n]
    return order[:steps]


class _Stream(IterableDataset):
    """One logical worker's batches, uint8 images; runs in a DataLoader worker or in-process."""

    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | str]:
        p = self.plan
        info = get_worker_info()
        worker = ((info.id if info else 0) + p.offset) % p.workers
        try:
            yield from self._batches(worker)
        except VmoeError as e:
            yield str(e)

    def _batches(self, worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p = self.plan
        first, stop = p.first[worker], p.stop[worker]
        if first >= stop:
            return
        images, labels = [], []
        for n, sample in enumerate(self._samples(worker)):
            if n < first * p.batch_size:  # resume: skip before decoding
                continue
            images.append(self._image(sample, worker, n))
            labels.append(sample["label"])
            if len(images) == p.batch_size:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.int64)
                images, labels = [], []
                if (n + 1) // p.batch_size == stop:
                    return
        if images and not p.train:  # eval keeps its last partial batch
            yield torch.stack(images), torch.tensor(labels, dtype=torch.int64)

    def _image(self, sample: dict[str, Any], worker: int, n: int) -> torch.Tensor:
        p = self.plan
        pixels = sample["image"]
        img = Image.fromarray(pixels) if isinstance(pixels, np.ndarray) else _decode(sample, p.channels)
        if p.train:
            rng = random.Random(f"augment:{p.seed}:{p.epoch}:{p.rank}:{worker}:{n}")
            img = augment_image(img, p.image_size, p.augment, rng)
        else:
            img = eval_view(img, p.image_size, p.crop_pct)
        return _to_tensor(img)

    def _samples(self, worker: int) -> Iterator[dict[str, Any]]:
        """Undecoded samples of this worker, in epoch order."""
        p = self.plan
        if not p.train:
            start, end = _eval_range(sum(s.count for s in p.shards), p.rank, p.world_size)
            for i, sample in enumerate(self._read_range(start, end)):
                if (i // p.batch_size) % p.workers == worker:  # this worker's batches; the rest stay undecoded
                    yield sample
            return
        rng = random.Random(f"samples:{p.seed}:{p.epoch}:{p.rank}:{worker}")
        if p.resampled:
            files = (rng.randrange(len(p.shards)) for _ in itertools.count())  # endless draws with replacement
        else:
            files = iter(
                _train_shards(_shard_order(len(p.shards), p.seed, p.epoch), p.rank, p.world_size, worker, p.workers)
            )
        samples = (s for i in files for s in self._read(p.shards[i]))
        yield from _shuffle(samples, SHUFFLE_BUFFER, rng)

    def _read(self, shard: _Shard) -> Iterable[dict[str, Any]]:
        """The samples of one shard: from the cache when there is one, else from its tar file."""
        p = self.plan
        return p.cache[shard.location] if p.cache is not None else _read_shard(shard, p.label_key, p.redo)

    def _read_range(self, start: int, end: int) -> Iterator[dict[str, Any]]:
        """Samples [start, end) of the split in manifest order, opening only the shards that hold them."""
        first = 0
        for shard in self.plan.shards:
            if first < end and start < first + shard.count:
                for n, sample in enumerate(self._read(shard), first):
                    if start <= n < end:
                        yield sample
            first += shard.count


def _shuffle(samples: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Shuffle buffer: emit a random one of the last `size` samples read; drain it shuffled at the end."""
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _decode(sample: dict[str, Any], channels: int) -> Image.Image:
    try:
        return _open(sample["image"], channels)
    except Exception as e:
        raise VmoeError(f"{sample['shard']}: sample {sample['key']}: unreadable image ({e}); re-shard") from None


def _stamp(shard: _Shard, redo: str) -> tuple[int, int]:
    """(size, mtime) of a local shard: a re-written shard gets a new cache entry. A remote shard's is its size in
    the manifest (it is checked against the bytes read)."""
    path = tars.local_path(shard.location)
    if path is None:
        return shard.size, 0
    try:
        stat = path.stat()
    except OSError:
        raise VmoeError(f"{path}: shard listed in {MANIFEST} is missing; {redo}") from None
    return stat.st_size, stat.st_mtime_ns


DECODED: dict[tuple[_Shard, str | None, int, tuple[int, int]], tuple[dict[str, Any], ...]] = {}  # the `cache` memo


def _cached_split(
    shards: list[_Shard], split: str, plan: _Plan, progress: ProgressFn | None
) -> dict[str, tuple[dict[str, Any], ...]]:
    """`data.cache`: every sample of each shard, its image decoded to uint8 pixels [H, W] or [H, W, 3], kept in
    `DECODED` for the rest of the process under the shard, its label key, channels and (size, mtime); only the
    shards not in it yet are read, telling `progress`."""
    keys = {s.location: (s, plan.label_key, plan.channels, _stamp(s, plan.redo)) for s in shards}
    missing = [s for s in shards if keys[s.location] not in DECODED]
    what, done, total = f"decode {split} (data.cache)", 0, sum(s.count for s in missing)
    for shard in missing:
        if progress is not None:
            progress(what, done, total)
        samples = _read_shard(shard, plan.label_key, plan.redo)
        DECODED[keys[shard.location]] = tuple(
            {**s, "image": np.asarray(_decode(s, plan.channels), np.uint8)} for s in samples
        )
        done += shard.count
    if missing and progress is not None:
        progress(what, done, total)
    return {s.location: DECODED[keys[s.location]] for s in shards}


def _read_shard(shard: _Shard, label_key: str | None, redo: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard as `{key, shard, image: bytes, label: int}`; checks its size (a local file's when it
    is opened, a remote one's once read to its end) and its count against the manifest."""
    local = tars.local_path(shard.location) is not None
    if local:
        _check_size(shard, _stamp(shard, redo)[0], redo)
    n = 0
    with tars.open_stream(shard.location) as stream:
        for sample in tars.samples(stream, shard.location, label_key, redo):
            n += 1
            yield {**sample, "shard": shard.location}
        stream.drain()
    if not local:
        _check_size(shard, stream.bytes, redo)
    if n != shard.count:
        raise VmoeError(f"{shard.location}: has {n} samples, {MANIFEST} says {shard.count}; {redo}")


def _check_size(shard: _Shard, size: int, redo: str) -> None:
    if size != shard.size:
        raise VmoeError(f"{shard.location}: {size} bytes, {MANIFEST} says {shard.size}; the shard changed: {redo}")
