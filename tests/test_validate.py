"""`--validate`: what `fast` (structure), `full` (decode) and `none` (header) keep and skip, on damaged files."""

import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmoe_cli.data.shard import ShardOptions, encode_image
from vmoe_cli.data.sources import FileItem
from vmoe_cli.data.validate import BadImage


def _photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random field plus noise: compresses like a photo, unlike a flat image."""
    field = rng.normal(size=(height // 8 + 1, width // 8 + 1, 3)).cumsum(0).cumsum(1)
    field = (field - field.min()) / (np.ptp(field) + 1e-9) * 220
    image = np.asarray(Image.fromarray(field.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC))
    return Image.fromarray(np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8))


def _damaged(raw: bytes, rnd: random.Random) -> list[bytes]:
    """Truncations, single bit flips and bursts of random bytes, anywhere past the format's signature."""
    out = [raw[: rnd.randint(8, len(raw) - 1)] for _ in range(6)]
    for _ in range(24):
        bad, i = bytearray(raw), rnd.randint(8, len(raw) - 3)
        bad[i] ^= 1 << rnd.randint(0, 7)
        out.append(bytes(bad))
    for _ in range(10):
        bad, i = bytearray(raw), rnd.randint(8, len(raw) - 10)
        bad[i : i + rnd.randint(1, 8)] = rnd.randbytes(8)
        out.append(bytes(bad[: len(raw)]))
    return out


def _kept(tmp_path: Path, raw: bytes, validate: str) -> bool:
    path = tmp_path / "x"
    path.write_bytes(raw)
    try:
        encode_image(FileItem("x", 0, path), ShardOptions(validate=validate))
    except BadImage:
        return False
    return True


def test_fast_skips_exactly_what_full_skips_on_damaged_jpegs_and_pngs(tmp_path: Path):
    """Damage in the headers (tables, frame, scans) as well as the data; `fast` decodes only what fails its check."""
    rng, rnd = np.random.default_rng(0), random.Random(0)
    variants = [("JPEG", {"quality": q, "subsampling": s}) for q in (75, 95) for s in (0, 2)]
    variants += [("JPEG", {"progressive": True}), ("JPEG", {"restart_marker_blocks": 4}), ("PNG", {}), ("PNG", {})]
    skipped_by_full = 0
    for fmt, kwargs in variants:
        image = _photo(rng, rnd.randint(60, 160), rnd.randint(60, 160))
        buffer = io.BytesIO()
        (image.convert("L") if rnd.random() < 0.3 else image).save(buffer, fmt, **kwargs)
        raw = buffer.getvalue()
        assert _kept(tmp_path, raw, "fast") and _kept(tmp_path, raw, "full")
        for bad in _damaged(raw, rnd):
            full = _kept(tmp_path, bad, "full")
            assert _kept(tmp_path, bad, "fast") == full, (fmt, kwargs)
            skipped_by_full += not full
    assert skipped_by_full > 100  # the damage is real: many of these files do not decode


def test_none_checks_only_the_header(tmp_path: Path):
    damaged = []
    for fmt in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        _photo(np.random.default_rng(1), 200, 150).save(buffer, fmt)
        damaged.append(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    flipped = bytearray(buffer.getvalue())
    flipped[len(flipped) // 2] ^= 1  # in the PNG's compressed pixels
    for raw in [*damaged, bytes(flipped)]:
        assert _kept(tmp_path, raw, "none") and not _kept(tmp_path, raw, "fast") and not _kept(tmp_path, raw, "full")


@pytest.mark.parametrize("validate", ["fast", "full", "none"])
def test_every_mode_stores_the_input_bytes(tmp_path: Path, validate: str):
    buffer = io.BytesIO()
    _photo(np.random.default_rng(2), 40, 30).save(buffer, "JPEG")
    (tmp_path / "a.jpg").write_bytes(buffer.getvalue())
    data, ext = encode_image(FileItem("a.jpg", 0, tmp_path / "a.jpg"), ShardOptions(validate=validate))
    assert (data, ext) == (buffer.getvalue(), "jpg")
