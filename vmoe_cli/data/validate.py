"""Whether an input image can be used, and how `vmoe shard` checks an image it stores as it is (`--validate`).

Every input is opened (its header parsed: format, mode, size). An image that is converted or resized is decoded
completely anyway. An image stored byte for byte (`--encoding keep`) is checked as `--validate` says:

    full   decoded completely, as every reader will decode it.
    fast   its structure checked without decoding, where that finds what a full decode finds:
             sequential (baseline) JPEG: the marker stream from start to end: every segment whole, one frame,
               scans whose headers name the frame's components, each component scanned once, the end-of-image
               marker after the last scan. libjpeg's sequential decoder fails on nothing else: damage inside
               the entropy-coded data is decoded with a warning (and grey blocks), not an error;
             PNG: the CRC of every chunk through IEND, what Pillow's `verify` checks.
           Other formats (progressive JPEG, WebP, ...) and any file that fails its check are decoded completely,
           so `fast` never rejects an image that `full` keeps.
    none   the header only.
"""

from __future__ import annotations

import functools
import io
import re

from PIL import Image, UnidentifiedImageError

VALIDATE_MODES = ("fast", "full", "none")
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_MARKER = re.compile(rb"\xff+([^\x00\xff])")  # a marker, after any fill bytes and any garbage (as libjpeg skips it)
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # the first marker that is not a restart: where a scan ends
_SEGMENTS = {  # marker -> the `_Jpeg` check of its segment (None: skipped); any other marker fails the walk
    0xC0: "frame_header", 0xC1: "frame_header",  # start of frame: baseline and extended sequential, Huffman coded
    0xC4: "tables", 0xDA: "scan", 0xDB: "quantization", 0xDD: "restart_interval",
    0xFE: None, **dict.fromkeys(range(0xE0, 0xF0)),  # comments, APPn
}  # fmt: skip


class BadImage(Exception):
    """An input that cannot be used; the message is the reason written to skipped.jsonl."""


def open_image(raw: bytes) -> Image.Image:
    """The image in `raw`, its header parsed (not decoded); BadImage with the reason when there is none."""
    try:
        return Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise BadImage("image too large (Pillow's decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except DECODE_ERRORS as e:
        raise BadImage(f"truncated or corrupt image ({e})") from None


def decode(image: Image.Image) -> None:
    """Decode `image` completely; BadImage with the reason when it cannot be."""
    try:
        image.load()
    except Image.DecompressionBombError:
        raise BadImage("image too large (Pillow's decompression-bomb limit)") from None
    except DECODE_ERRORS as e:
        raise BadImage(f"truncated or corrupt image ({e})") from None


def check_kept(raw: bytes, image: Image.Image, validate: str) -> None:
    """Check an image stored as its bytes `raw` (`image` opened from them) as `validate` says (module docstring)."""
    if validate == "none" or (validate == "fast" and _structure_ok(raw, image)):
        return
    decode(open_image(raw) if validate == "fast" else image)  # fast: `verify` may have consumed `image`


def _structure_ok(raw: bytes, image: Image.Image) -> bool:
    """Whether the structure check of `image`'s format passes; False when it fails or there is none."""
    if image.format == "JPEG":
        return _jpeg_complete(raw)
    if image.format == "PNG":
        try:
            image.verify()
        except DECODE_ERRORS:
            return False
        return True
    return False


def _jpeg_complete(raw: bytes) -> bool:
    """Whether `raw` is a sequential Huffman-coded JPEG that libjpeg decodes without an error: its marker stream
    complete and every table, frame and scan header what libjpeg accepts (module docstring)."""
    jpeg, pos, size = _Jpeg(), 2, len(raw)
    while True:
        if pos + 1 < size and raw[pos] == 0xFF and raw[pos + 1] not in (0x00, 0xFF):
            marker = raw[pos + 1]  # the usual case: the next marker right where the last segment ended
        else:
            found = _MARKER.search(raw, pos)
            if found is None:
                return False
            pos, marker = found.end() - 2, found[1][0]
        if marker == 0xD9:
            return jpeg.frame is not None and not jpeg.unscanned
        check = _SEGMENTS.get(marker, False)
        if check is False or pos + 4 > size:
            return False
        end = pos + 2 + (raw[pos + 2] << 8 | raw[pos + 3])
        if end > size or (check is not None and not getattr(jpeg, check)(raw[pos + 4 : end])):
            return False
        if marker == 0xDA:
            found = _SCAN_END.search(raw, end)
            if found is None:
                return False
            end = found.start()
        pos = end


class _Jpeg:
    """What the headers of a JPEG defined so far, each checked as libjpeg checks it; every check returns False
    where libjpeg would stop with an error (or where this check does not follow the file: a full decode decides)."""

    def __init__(self) -> None:
        self.frame: dict[int, tuple[int, int, int]] | None = None  # component id -> (h, v, quantization table)
        self.unscanned: set[int] = set()
        self.quantized: set[int] = set()  # quantization tables defined
        self.huffman: dict[tuple[int, int], tuple[bool, int]] = {}  # (0 DC | 1 AC, slot) -> (codes valid, top value)

    def frame_header(self, seg: bytes) -> bool:
        """SOF0/SOF1: 8-bit samples, a size, 1 to 10 components, sampling factors 1-4 that divide the largest
        (libjpeg upsamples by whole factors only); one frame."""
        count = seg[5] if len(seg) > 5 else 0
        if self.frame is not None or seg[:1] != b"\x08" or not 1 <= count <= 10 or len(seg) != 6 + 3 * count:
            return False
        if not (seg[1] << 8 | seg[2]) or not (seg[3] << 8 | seg[4]):
            return False
        self.frame = {seg[i]: (seg[i + 1] >> 4, seg[i + 1] & 15, seg[i + 2]) for i in range(6, len(seg), 3)}
        factors = list(self.frame.values())
        h_max, v_max = max(h for h, _, _ in factors), max(v for _, v, _ in factors)
        self.unscanned = set(self.frame)
        return len(self.frame) == count and all(
            1 <= h <= 4 and 1 <= v <= 4 and h_max % h == 0 and v_max % v == 0 for h, v, _ in factors
        )

    def quantization(self, seg: bytes) -> bool:
        slots = _quantization_slots(seg)
        self.quantized.update(slots or ())
        return slots is not None

    def tables(self, seg: bytes) -> bool:
        tables = _huffman_tables(seg)
        self.huffman.update(tables or ())
        return tables is not None

    def scan(self, seg: bytes) -> bool:
        """SOS: 1 to 4 frame components not yet scanned, at most 10 blocks per MCU, defined quantization tables,
        and defined, valid Huffman tables (a DC table's values at most 15)."""
        count = seg[0] if seg else 0
        if self.frame is None or not 1 <= count <= 4 or len(seg) != 4 + 2 * count:
            return False
        chosen = {seg[1 + 2 * i]: seg[2 + 2 * i] for i in range(count)}
        if len(chosen) != count or not set(chosen) <= self.unscanned:
            return False
        self.unscanned -= set(chosen)
        if count > 1 and sum(self.frame[c][0] * self.frame[c][1] for c in chosen) > 10:
            return False
        for component, choice in chosen.items():
            dc, ac = self.huffman.get((0, choice >> 4), (False, 0)), self.huffman.get((1, choice & 15), (False, 0))
            if self.frame[component][2] not in self.quantized or not (dc[0] and dc[1] <= 15 and ac[0]):
                return False
        return True

    def restart_interval(self, seg: bytes) -> bool:
        return len(seg) == 2


@functools.lru_cache(maxsize=256)  # most files of a corpus share their encoder's tables
def _quantization_slots(seg: bytes) -> tuple[int, ...] | None:
    """DQT: tables 0-3 of 64 8-bit or 16-bit entries, filling the segment; None when it is not that."""
    slots, i = [], 0
    while i < len(seg):
        slot, size = seg[i] & 15, 128 if seg[i] >> 4 else 64
        if slot > 3 or i + 1 + size > len(seg):
            return None
        slots.append(slot)
        i += 1 + size
    return tuple(slots)


@functools.lru_cache(maxsize=256)
def _huffman_tables(seg: bytes) -> tuple[tuple[tuple[int, int], tuple[bool, int]], ...] | None:
    """DHT: DC or AC tables 0-3, each 16 code counts and at most 256 values, filling the segment; per table
    ((0 DC | 1 AC, slot), (whether its codes are valid, its largest value)). None when it is not that."""
    tables, i = [], 0
    while len(seg) - i > 16:
        index, counts = seg[i], seg[i + 1 : i + 17]
        count = sum(counts)
        if index & 0xEC or count > 256 or i + 17 + count > len(seg):
            return None
        tables.append(((index >> 4, index & 3), (_canonical(counts), max(seg[i + 17 : i + 17 + count], default=0))))
        i += 17 + count
    return tuple(tables) if i == len(seg) else None


def _canonical(counts: bytes) -> bool:
    """Whether 16 code counts give canonical Huffman codes, none of them all ones (libjpeg's check)."""
    code = 0
    for length, count in enumerate(counts, 1):
        code += count
        if code >= 1 << length:
            return False
        code <<= 1
    return True
