"""The opening step every evaluator shares: a checkpoint opened as its model and preprocessing, DATA opened
as evaluation shards, and the one evaluation loader built from the two.

An evaluator reads open -> run -> rows: `open_checkpoint` and `open_data` here, its own pass over
`eval_loader` batches, then its results. The weights' and manifest's hashes are the identities that feature
caches and resumable state are keyed on; they are computed on first use.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import Tensor

from vmoe_cli.checkpoint import WEIGHTS, load_model, load_recipe_of, resolve_checkpoint
from vmoe_cli.data.config import DataConfig
from vmoe_cli.data.loader import Loader, build_loader
from vmoe_cli.data.manifest import MANIFEST, check_not_stock_tars, file_sha256, read_manifest
from vmoe_cli.data.shard import eval_shards
from vmoe_cli.errors import VmoeError
from vmoe_cli.models.vit import VisionTransformer
from vmoe_cli.progress import ProgressFn


@dataclass(frozen=True)
class Preprocess:
    """How a model reads images: resized (or centre-cropped) to `image_size` with `channels` channels, then
    (x / 255 - mean) / std."""

    image_size: int
    channels: int
    mean: float | list[float]  # the model's training normalisation
    std: float | list[float]
    crop_pct: float | None = None  # its recipe's data.eval_crop_pct: None squashes the image to a square


@dataclass
class Opened:
    """A checkpoint opened for evaluation."""

    name: str  # as the user gave it: shown in results
    path: Path  # the checkpoint directory (a run directory's newest checkpoint)
    model: VisionTransformer  # in evaluation mode
    preprocess: Preprocess  # the model's input size and its recipe's normalisation

    @cached_property
    def weights_sha256(self) -> str:
        """The checkpoint's identity in feature caches and saved sweep state."""
        return file_sha256(self.path / WEIGHTS)


@dataclass
class EvalData:
    """DATA opened as evaluation shards."""

    name: str  # as the user gave it: shards or a `vmoe shard` source
    shard_dir: Path
    manifest: dict[str, Any]

    @cached_property
    def manifest_sha256(self) -> str:
        """The data's identity in feature caches and saved sweep state."""
        return file_sha256(self.shard_dir / MANIFEST)


def open_checkpoint(checkpoint: str | Path, option: str = "--checkpoint") -> Opened:
    """The model of `checkpoint` (a checkpoint or run directory; `option` names the flag in errors) with the
    preprocessing its recipe evaluates with."""
    path = resolve_checkpoint(checkpoint, option)
    model = load_model(path)
    data = load_recipe_of(path).data or DataConfig()
    preprocess = Preprocess(model.cfg.image_size, model.cfg.channels, data.mean, data.std, data.eval_crop_pct)
    return Opened(str(checkpoint), path, model, preprocess)


def open_data(data: str, cache_dir: str | Path, splits: Sequence[str], hint: str) -> EvalData:
    """DATA's evaluation shards: a shard folder or index, or a source sharded once into `cache_dir`; a one-line
    error naming the splits it has, and ending with `hint`, when one of `splits` is missing, and one saying how to
    index them for WebDataset tars without a manifest."""
    check_not_stock_tars(data)
    shard_dir = eval_shards(data, Path(cache_dir).expanduser())
    manifest = read_manifest(shard_dir)
    for split in splits:
        if split not in manifest["splits"]:
            raise VmoeError(f"{data}: no split {split!r} (has: {', '.join(manifest['splits'])}); {hint}")
    return EvalData(data, shard_dir, manifest)


def eval_loader(shard_dir: Path, split: str, batch_size: int, preprocess: Preprocess, start_batch: int = 0) -> Loader:
    """Evaluation batches of `split` in manifest order, read as `preprocess` says, from batch `start_batch` on."""
    reading = DataConfig(mean=preprocess.mean, std=preprocess.std, eval_crop_pct=preprocess.crop_pct)  # no cache
    return build_loader(
        shard_dir, split, reading, batch_size=batch_size, image_size=preprocess.image_size,
        channels=preprocess.channels, train=False, start_batch=start_batch,
    )  # fmt: skip


def eval_batches(
    source: EvalData,
    split: str,
    batch_size: int,
    preprocess: Preprocess,
    what: str,
    progress: ProgressFn | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """The `eval_loader` batches of `split`, telling `progress` the images done (as phase `what` DATA SPLIT)
    before the first and after each one is used."""
    total, done = source.manifest["splits"][split]["count"], 0
    phase = f"{what} {source.name} {split}"
    if progress is not None:
        progress(phase, done, total)
    for images, labels in eval_loader(source.shard_dir, split, batch_size, preprocess):
        yield images, labels
        done += len(labels)
        if progress is not None:
            progress(phase, done, total)
