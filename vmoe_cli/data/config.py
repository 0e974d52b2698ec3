"""The `data:` section of a recipe: which shards, how the loader reads them, how training augments them."""

from __future__ import annotations

from dataclasses import dataclass, field

from vmoe_cli.data.augment import AugmentConfig


@dataclass
class DataConfig:
    """Where the images come from and how the loader reads them (vmoe_cli/data/loader.py)."""

    shards: str = ""  # shard directory written by `vmoe shard` (relative paths: to the working directory)
    train_split: str = "train"  # split trained on
    eval_split: str = "test"  # split evaluated on ('minival' for sources without a test split)
    workers: int = 0  # DataLoader worker processes per rank; 0 reads in the training process
    cache: bool = False  # decode the splits once and keep the pixels in RAM (small datasets): same batches, faster
    resampled: bool = False  # draw shards with replacement (epochs of `epoch_images`); needs no shards >= ranks
    epoch_images: int | None = None  # epoch length in resampled mode; null = the split's size
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training augmentation and mixup alpha
    # evaluation's view of an image: null squashes the whole image to image_size x image_size; a fraction f in
    # (0, 1] resizes the shorter side to floor(image_size / f), aspect kept, then takes the centre image_size
    # square (timm's crop_pct; 0.875 is the usual ImageNet value). Training augmentation is not affected.
    eval_crop_pct: float | None = None
    mean: float | list[float] = 0.5  # pixels become (x / 255 - mean) / std, one value or one per channel
    std: float | list[float] = 0.5
