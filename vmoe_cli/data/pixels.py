"""Any decoded Pillow image -> 8-bit grey (L) or RGB pixels, as an image viewer shows them.

The shard writer stores only 8-bit L or RGB images, so every reader (vmoe's loader, the stock webdataset
library, a viewer) gets the same pixels. The rules, by Pillow mode:

    L, RGB                     unchanged
    1                          L: 0 or 255
    P, CMYK, YCbCr, LAB, HSV   RGB, by Pillow's conversion (an embedded ICC profile is not applied)
    RGBX                       RGB (the padding byte dropped)
    LA, La, RGBA, RGBa, PA     alpha composited on white (what viewers show): L or RGB
      and L, RGB, P with a transparent colour; out = round((c * a + 255 * (255 - a)) / 255)
    I;16, I;16L, I;16B, I;16N  16-bit: L = round(v * 255 / 65535)
    I (32-bit integers)        values within 0..65535 as 16-bit (16-bit PGM and some TIFFs decode to I);
                               otherwise the image's min..max scaled to 0..255 (rounded; a constant image: 0)
    F (32-bit float)           values within 0..1: round(v * 255); otherwise min..max scaled as for I
    anything else, or a float image with NaN or infinite values: UnsupportedImage, with the reason
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")  # "a": premultiplied, made straight by Pillow first
CONVERTED = ("P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")  # to RGB by Pillow
PLAIN = ("1", "L", "P", "RGB", "CMYK")  # modes whose plain convert("L") equals convert("RGB").convert("L")


class UnsupportedImage(ValueError):
    """An image whose pixels have no faithful 8-bit form; the message is the reason."""


def is_plain(image: Image.Image) -> bool:
    """Whether Pillow's plain `convert("L")` and `convert("RGB")`, what every reader does, already give the pixels
    of `to_8bit` (8 bits, no alpha, no transparent colour): then the image's bytes can be stored as they are."""
    return image.mode in PLAIN and "transparency" not in image.info


def to_8bit(image: Image.Image) -> Image.Image:
    """`image` as 8-bit L or RGB by the rules of the module docstring; UnsupportedImage when there is none."""
    mode = image.mode
    if mode in ("L", "RGB") and "transparency" not in image.info:
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ALPHA or (mode in ("L", "RGB", "P") and "transparency" in image.info):
        return _on_white(image.convert("LA" if mode in ("L", "LA", "La") else "RGBA"))
    if mode in CONVERTED:
        return image.convert("RGB")
    if mode in SIXTEEN_BIT:
        return _grey((np.asarray(image).astype(np.uint32) * 255 + 32767) // 65535)
    if mode in ("I", "F"):
        return _grey(_scaled(np.asarray(image), mode))
    raise UnsupportedImage(f"unsupported image mode {mode}")


def _on_white(image: Image.Image) -> Image.Image:
    """An LA or RGBA image composited on opaque white, as L or RGB, rounded to nearest."""
    pixels = np.asarray(image).astype(np.uint32)
    colour, alpha = pixels[..., :-1], pixels[..., -1:]
    out = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8)) if image.mode == "RGBA" else _grey(out[..., 0])


def _scaled(values: np.ndarray, mode: str) -> np.ndarray:
    """32-bit integer or float values -> 0..255 (see the module docstring for the rule)."""
    values = values.astype(np.float64)
    if values.size == 0:
        raise UnsupportedImage("empty image")
    if not np.isfinite(values).all():
        raise UnsupportedImage("float image with NaN or infinite values")
    low, high = values.min(), values.max()
    if mode == "I" and low >= 0 and high <= 65535:
        return values * 255 / 65535
    if mode == "F" and low >= 0 and high <= 1:
        return values * 255
    return (values - low) * 255 / (high - low) if high > low else np.zeros_like(values)


def _grey(values: np.ndarray) -> Image.Image:
    """Values already in 0..255 -> an L image, rounded to nearest."""
    return Image.fromarray(np.rint(values).astype(np.uint8))
