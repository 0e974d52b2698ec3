"""The `data:` section of a recipe: which shards, how the loader reads them, how training augments them."""

from __future__ import annotations

from dataclasses import dataclass, field

from vmoe_cli.errors import VmoeError


@dataclass
class AugmentConfig:
    """Training augmentation of a recipe; the defaults turn everything off."""

    crop_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # random-resized crop area range; [1, 1] = off
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # aspect-ratio range of the crop
    flip: bool = False  # random horizontal flip with probability 0.5
    randaugment_ops: int = 0  # RandAugment N: ops applied per image; 0 = off
    randaugment_magnitude: int = 10  # RandAugment M on the 0-10 scale (data/augment.py says)
    mixup: float = 0.0  # mixup alpha (Beta(alpha, alpha) mixing weight per batch); 0 = off

    def validate(self) -> None:
        """Raise VmoeError naming the field when a value is impossible."""
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise VmoeError(f"augment.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise VmoeError(f"augment.crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if self.randaugment_ops < 0 or self.randaugment_magnitude < 0:
            raise VmoeError("augment.randaugment_ops and augment.randaugment_magnitude must be >= 0")
        if self.mixup < 0:
            raise VmoeError(f"augment.mixup must be >= 0, got {self.mixup}")


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
