"""Training augmentation: random-resized crop, flip and a RandAugment-style policy in Pillow; mixup in torch.

Image ops take a `random.Random` seeded per sample by the loader, so a sample's augmentation depends only
on its position in the epoch, never on worker state: that is what lets a resumed run replay an epoch exactly.
Mixup works on whole batches and takes the train loop's `torch.Generator`.

RandAugment magnitude M is on the 0-10 scale of the TF/big_vision/timm policies: 10 is each op's reference
maximum (rotate 30 degrees, shear 0.3, translate 45% of the side, enhance factor 1 +- 0.9, solarize threshold 0,
posterize to 4 bits); larger M extrapolates, as big_vision's `randaug(2, 15)` does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from PIL import Image, ImageEnhance, ImageOps

from vmoe_cli.data.config import AugmentConfig

FILL = 128  # grey for the corners uncovered by geometric ops, as big_vision uses


def augment_image(img: Image.Image, size: int, cfg: AugmentConfig, rng: random.Random) -> Image.Image:
    """Crop (or resize) `img` to `size` x `size`, then flip and apply RandAugment as `cfg` asks."""
    img = random_resized_crop(img, size, cfg.crop_scale, cfg.crop_ratio, rng)
    if cfg.flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return randaugment(img, cfg.randaugment_ops, cfg.randaugment_magnitude, rng)


def random_resized_crop(
    img: Image.Image, size: int, scale: list[float], ratio: list[float], rng: random.Random
) -> Image.Image:
    """Inception-style crop: area in `scale` of the image, aspect in `ratio` (log-uniform), resized to `size`.

    Ten tries, then the largest centred crop within `ratio` (torchvision's rule). `scale == [1, 1]` resizes only.
    """
    w, h = img.size
    if scale[0] >= 1.0:
        return resize(img, size)
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))
    aspect = min(max(w / h, ratio[0]), ratio[1])
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    x, y = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))


def resize(img: Image.Image, size: int) -> Image.Image:
    """`img` at `size` x `size` (bilinear, with Pillow's antialiasing when shrinking); unchanged if already so."""
    return img if img.size == (size, size) else img.resize((size, size), Image.Resampling.BILINEAR)


def eval_view(img: Image.Image, size: int, crop_pct: float | None) -> Image.Image:
    """What evaluation sees of `img`: squashed to `size` x `size` when `crop_pct` is None; otherwise the shorter
    side resized to floor(size / crop_pct), aspect kept, and the centre `size` x `size` cut out (timm's and
    torchvision's Resize + CenterCrop: the longer side truncated, offsets rounded)."""
    if crop_pct is None:
        return resize(img, size)
    w, h = img.size
    short = math.floor(size / crop_pct)
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    return img.crop((left, top, left + size, top + size))


def _signed(value: float, rng: random.Random) -> float:
    return value if rng.random() < 0.5 else -value


def _fill(img: Image.Image) -> int | tuple[int, ...]:
    return FILL if img.mode == "L" else (FILL,) * len(img.getbands())


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=_fill(img))


def _enhance(kind: type) -> Callable[[Image.Image, float, random.Random], Image.Image]:
    return lambda img, m, rng: kind(img).enhance(1.0 + _signed(0.09 * m, rng))


# Each op maps (image, magnitude M, rng) -> image; M = 10 is the reference maximum strength.
OPS: dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "identity": lambda img, m, rng: img,
    "autocontrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "equalize": lambda img, m, rng: ImageOps.equalize(img),
    "rotate": lambda img, m, rng: img.rotate(_signed(3.0 * m, rng), Image.Resampling.BILINEAR, fillcolor=_fill(img)),
    "solarize": lambda img, m, rng: ImageOps.solarize(img, max(0, round(256 - 25.6 * m))),
    "posterize": lambda img, m, rng: ImageOps.posterize(img, min(8, max(1, 8 - round(0.4 * m)))),
    "color": _enhance(ImageEnhance.Color),
    "contrast": _enhance(ImageEnhance.Contrast),
    "brightness": _enhance(ImageEnhance.Brightness),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "shear_x": lambda img, m, rng: _affine(img, (1, _signed(0.03 * m, rng), 0, 0, 1, 0)),
    "shear_y": lambda img, m, rng: _affine(img, (1, 0, 0, _signed(0.03 * m, rng), 1, 0)),
    "translate_x": lambda img, m, rng: _affine(img, (1, 0, _signed(0.045 * m * img.size[0], rng), 0, 1, 0)),
    "translate_y": lambda img, m, rng: _affine(img, (1, 0, 0, 0, 1, _signed(0.045 * m * img.size[1], rng))),
}


def randaugment(img: Image.Image, num_ops: int, magnitude: float, rng: random.Random) -> Image.Image:
    """Apply `num_ops` ops drawn uniformly with replacement from OPS, each at `magnitude` (RandAugment)."""
    names = list(OPS)
    for _ in range(num_ops):
        img = OPS[rng.choice(names)](img, magnitude, rng)
    return img


def mixup(
    images: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image and its soft target with the batch's reverse: `lam * x + (1 - lam) * x.flip(0)`.

    `targets` are soft labels `[B, classes]` (one-hot or smoothed). One `lam ~ Beta(alpha, alpha)` per batch,
    drawn from a seed taken from `generator`, so the train loop's RNG state alone decides it.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = random.Random(seed).betavariate(alpha, alpha)
    return lam * images + (1 - lam) * images.flip(0), lam * targets + (1 - lam) * targets.flip(0)
