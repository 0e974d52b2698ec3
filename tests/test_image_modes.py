"""Every Pillow image mode, written to a real file, sharded and read back through the loader: the 8-bit pixels
a viewer shows (16-bit and float scaled, alpha composited on white, CMYK and the rest converted), or a skip."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vmoe_cli.data.config import DataConfig
from vmoe_cli.data.loader import build_loader
from vmoe_cli.data.manifest import FORMAT
from vmoe_cli.data.pixels import UnsupportedImage, to_8bit
from vmoe_cli.data.shard import ShardOptions, write_shards
from vmoe_cli.data.sources import open_source
from vmoe_cli.errors import VmoeError

SIZE = 2  # images are SIZE x SIZE, so the loader's resize leaves them alone
SIXTEEN_BIT = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
SIXTEEN_BIT_AS_8 = [[0, 4], [128, 255]]  # round(v * 255 / 65535)


def shard_and_load(tmp_path: Path, write: dict[str, Callable[[Path], None]], channels: int, encoding: str = "keep"):
    """Write each file (name -> writer) into a one-class folder source, shard it, and read every sample back
    through the loader as uint8: {file name: [H, W] or [H, W, 3] pixels}; also returns the manifest."""
    for name, writer in write.items():
        path = tmp_path / "src" / "a" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
    out = tmp_path / "out"
    manifest = write_shards(open_source(str(tmp_path / "src")), out, ShardOptions(encoding=encoding))
    loader = build_loader(
        out, "train", DataConfig(), batch_size=1, image_size=SIZE, channels=channels, train=False, raw=True
    )
    ids = [json.loads(s["json"])["id"] for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)]
    pixels = [images[0].permute(1, 2, 0).numpy() for images, _ in loader]
    return {i.removeprefix("a/"): p[..., 0] if channels == 1 else p for i, p in zip(ids, pixels, strict=True)}, manifest


def load_one(tmp_path: Path, name: str, writer: Callable[[Path], None], channels: int, encoding: str = "keep"):
    loaded, manifest = shard_and_load(tmp_path, {name: writer}, channels, encoding)
    assert manifest["skipped"] == 0
    return loaded[name]


def saver(image: Image.Image, **options) -> Callable[[Path], None]:
    return lambda path: image.save(path, **options)


def rgba(pixels: list[tuple[int, ...]], mode: str) -> Image.Image:
    return Image.fromarray(np.array(pixels, dtype=np.uint8).reshape(SIZE, SIZE, Image.getmodebands(mode)), mode=mode)


@pytest.mark.parametrize("encoding", ["keep", "png"])
@pytest.mark.parametrize(
    ("name", "image", "mode"),
    [
        ("16bit.png", Image.fromarray(SIXTEEN_BIT), "I;16"),
        ("16bit-big-endian.tif", Image.frombytes("I;16B", (SIZE, SIZE), SIXTEEN_BIT.astype(">u2").tobytes()), "I;16B"),
        ("16bit.pgm", Image.fromarray(SIXTEEN_BIT), "I"),  # 32-bit integers, within 0..65535
    ],
)
def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path, name: str, image: Image.Image, mode: str, encoding: str):
    assert load_one(tmp_path, name, saver(image), channels=1, encoding=encoding).tolist() == SIXTEEN_BIT_AS_8
    assert Image.open(tmp_path / "src" / "a" / name).mode == mode  # the mode Pillow reads the file in


def test_32_bit_integers_beyond_16_bits_are_scaled_by_their_range(tmp_path: Path):
    image = Image.fromarray(np.array([[-10, 500], [1270, 2540]], dtype=np.int32))  # mode I
    assert image.mode == "I"
    assert load_one(tmp_path, "int32.tif", saver(image), channels=1).tolist() == [[0, 51], [128, 255]]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([[0.0, 0.2], [0.75, 1.0]], [[0, 51], [191, 255]]),  # within [0, 1]: round(v * 255)
        ([[-50.0, 0.0], [100.0, 200.0]], [[0, 51], [153, 255]]),  # otherwise min..max -> 0..255
    ],
)
def test_float_images_are_scaled(tmp_path: Path, values: list, expected: list):
    image = Image.fromarray(np.array(values, dtype=np.float32))
    assert image.mode == "F"
    assert load_one(tmp_path, "float.tif", saver(image), channels=1).tolist() == expected


@pytest.mark.parametrize("encoding", ["keep", "png"])
@pytest.mark.parametrize(
    ("name", "image", "options", "channels", "expected"),
    [
        (
            "rgba.png",
            rgba([(200, 100, 0, 255), (200, 100, 0, 0), (200, 100, 0, 128), (0, 0, 255, 64)], "RGBA"),
            {},
            3,
            [[[200, 100, 0], [255, 255, 255]], [[227, 177, 127], [191, 191, 255]]],
        ),
        ("la.png", rgba([(50, 255), (50, 0), (50, 128), (0, 64)], "LA"), {}, 1, [[50, 255], [152, 191]]),
        (
            "grey-key.png",
            Image.fromarray(np.array([[7, 9], [200, 9]], dtype=np.uint8)),
            {"transparency": 9},
            1,
            [[7, 255], [200, 255]],
        ),
        (
            "rgb-key.png",
            rgba([(1, 2, 3), (10, 20, 30), (1, 2, 3), (40, 50, 60)], "RGB"),
            {"transparency": (1, 2, 3)},
            3,
            [[[255, 255, 255], [10, 20, 30]], [[255, 255, 255], [40, 50, 60]]],
        ),
    ],
)
def test_alpha_and_transparent_colours_are_composited_on_white(
    tmp_path: Path, name: str, image: Image.Image, options: dict, channels: int, expected: list, encoding: str
):
    assert load_one(tmp_path, name, saver(image, **options), channels, encoding).tolist() == expected


def palette_image() -> Image.Image:
    image = Image.fromarray(np.array([[0, 1], [2, 0]], dtype=np.uint8), mode="P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    return image


def test_palette_with_transparency_is_composited_on_white(tmp_path: Path):
    """Palette entry 1 is fully transparent, entry 2 half (alpha 128)."""
    writer = saver(palette_image(), transparency=bytes([255, 0, 128]))
    expected = [[[255, 0, 0], [255, 255, 255]], [[127, 127, 255], [255, 0, 0]]]
    assert load_one(tmp_path, "palette-alpha.png", writer, channels=3).tolist() == expected


def test_palette_bilevel_and_cmyk_convert_as_viewers_show_them(tmp_path: Path):
    cmyk = rgba([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 255, 0, 0)], "CMYK")
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    files = {
        "palette.png": saver(palette_image()),
        "cmyk.tif": saver(cmyk),  # converted: white, cyan, black, magenta
        "cmyk.jpg": saver(Image.fromarray(noise, mode="CMYK"), quality=95),  # kept: Pillow converts when read
    }
    loaded, _ = shard_and_load(tmp_path, files, channels=3)
    assert loaded["palette.png"].tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 0, 0]]]
    assert loaded["cmyk.tif"].tolist() == [[[255, 255, 255], [0, 255, 255]], [[0, 0, 0], [255, 0, 255]]]
    decoded = Image.open(tmp_path / "src" / "a" / "cmyk.jpg")
    assert decoded.mode == "CMYK"
    assert np.array_equal(loaded["cmyk.jpg"], np.asarray(decoded.convert("RGB")))
    bilevel = Image.fromarray(np.array([[True, False], [False, True]])).convert("1")
    assert load_one(tmp_path / "bilevel", "bilevel.png", saver(bilevel), channels=1).tolist() == [[255, 0], [0, 255]]


@pytest.mark.parametrize(("mode", "neutral"), [("YCbCr", 128), ("LAB", 0)])  # chroma of a grey: offset or signed
def test_other_colour_spaces_become_rgb(tmp_path: Path, mode: str, neutral: int):
    image = rgba([(0, neutral, neutral), (255, neutral, neutral), (128, 85, 200), (76, 200, 30)], mode)
    loaded = load_one(tmp_path, "colour.tif", saver(image), channels=3)
    decoded = Image.open(tmp_path / "src" / "a" / "colour.tif")
    assert decoded.mode == mode
    assert np.array_equal(loaded, np.asarray(decoded.convert("RGB")))
    assert loaded[0, 1].min() >= 250 and loaded[0, 0].max() <= 5  # white and black


def test_in_memory_modes_without_a_file_format():
    """HSV, premultiplied alpha, palette + alpha and padded RGB exist only in memory; the same rules apply."""
    hsv = to_8bit(rgba([(0, 255, 255), (0, 0, 255), (85, 255, 255), (0, 0, 0)], "HSV"))
    assert hsv.mode == "RGB" and np.asarray(hsv).tolist() == [[[255, 0, 0], [255, 255, 255]], [[0, 255, 0], [0, 0, 0]]]
    straight = rgba([(200, 100, 0, 255), (200, 100, 0, 0), (200, 100, 0, 128), (0, 0, 255, 64)], "RGBA")
    assert np.asarray(to_8bit(straight.convert("RGBa"))).tolist()[0] == [[200, 100, 0], [255, 255, 255]]
    la = to_8bit(rgba([(50, 255), (50, 0), (50, 255), (50, 0)], "LA").convert("La"))
    assert la.mode == "L" and np.asarray(la).tolist() == [[50, 255], [50, 255]]
    pa = palette_image().convert("PA")
    pa.putalpha(Image.fromarray(np.array([[255, 0], [255, 255]], dtype=np.uint8)))
    assert np.asarray(to_8bit(pa)).tolist() == [[[255, 0, 0], [255, 255, 255]], [[0, 0, 255], [255, 0, 0]]]
    padded = rgba([(1, 2, 3, 0)] * 4, "RGBX")
    assert to_8bit(padded).mode == "RGB" and np.asarray(to_8bit(padded))[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(UnsupportedImage, match="NaN or infinite"):
        to_8bit(Image.fromarray(np.array([[0.0, np.inf]], dtype=np.float32)))


def test_a_float_image_with_nan_is_skipped_with_the_reason(tmp_path: Path):
    nan = Image.fromarray(np.array([[0.0, np.nan], [0.5, 1.0]], dtype=np.float32))
    good = Image.fromarray(np.full((SIZE, SIZE), 9, dtype=np.uint8))
    loaded, manifest = shard_and_load(tmp_path, {"nan.tif": saver(nan), "good.png": saver(good)}, channels=1)
    assert list(loaded) == ["good.png"] and manifest["skipped"] == 1
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"id": "a/nan.tif", "reason": "float image with NaN or infinite values"}]


def test_jpg_encoding_converts_the_same_way(tmp_path: Path):
    """Re-encoding to JPEG: alpha composited and 16-bit scaled before the (lossy, so +-3) JPEG."""
    half = Image.new("RGBA", (SIZE, SIZE), (0, 0, 255, 128))
    grey16 = Image.fromarray(np.full((SIZE, SIZE), 32768, dtype=np.uint16))
    loaded, _ = shard_and_load(tmp_path, {"half.png": saver(half), "grey16.png": saver(grey16)}, 3, encoding="jpg")
    assert np.abs(loaded["half.png"].astype(int) - [127, 127, 255]).max() <= 3
    assert np.abs(loaded["grey16.png"].astype(int) - 128).max() <= 3


def test_loader_refuses_a_16_bit_image_in_a_shard_of_another_writer(tmp_path: Path):
    """A shard written by another tool (or an older vmoe) holding a 16-bit PNG: one line, not all-white pixels."""
    png = io.BytesIO()
    Image.fromarray(SIXTEEN_BIT).save(png, format="PNG")
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        sink.write({"__key__": "train_00000000", "png": png.getvalue(), "cls": "0"})
    size = (tmp_path / "train-000000.tar").stat().st_size
    shards = [{"file": "train-000000.tar", "count": 1, "bytes": size, "sha256": ""}]
    manifest = {"format": FORMAT, "classes": ["a"], "splits": {"train": {"count": 1, "shards": shards}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loader = build_loader(tmp_path, "train", DataConfig(), batch_size=1, image_size=SIZE, channels=1, train=False)
    with pytest.raises(VmoeError, match=r"sample train_00000000: unreadable image \(I;16 image, more than 8 bits"):
        list(loader)
