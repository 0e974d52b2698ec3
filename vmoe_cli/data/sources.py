"""Image sources: what `vmoe shard` reads, listed as a stream of rows in a canonical order.

A source is one of: the name `digits` (scikit-learn's 1,797 embedded 8x8 digits); an MNIST-style
IDX folder (`train-images-idx3-ubyte[.gz]` + `train-labels-idx1-ubyte[.gz]`, `t10k-*` for test);
a folder tree with one sub-folder per class (optionally under `train/` and `val/` or `test/`);
or a list file (.csv, .tsv, .jsonl) with a path and a label column, paths relative to the file.

Listing only names the inputs: no image is opened, and no file is looked at one by one (unless their sizes
are asked for, by --shard-bytes): a list file is read as a stream, a folder walked one directory listing at a
time. `SourceRows` yields the rows in chunks of strings and numpy arrays (`Rows`), so a listing of any length
can be written to disk as it streams (`data/plan.py`); the shard writer's workers read and validate the images.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import numpy as np

from vmoe_cli.errors import VmoeError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
PATH_COLUMNS = ("path", "file", "filename", "image")
LABEL_COLUMNS = ("label", "class")
SPLIT_NAMES = {"train": "train", "test": "test", "val": "test", "valid": "test", "validation": "test"}
IDX_PREFIXES = {"train": "train", "t10k": "test", "test": "test"}
LISTED_SPLITS = ("train", "test")  # the splits a source can have, by code; minival is held out of train later
CHUNK = 16384  # rows per `Rows` chunk


@dataclass(frozen=True)
class FileItem:
    """An image file on disk; its bytes are read (and validated) by the shard writer."""

    id: str  # path relative to the source, as the user knows it
    label: int
    path: Path


@dataclass(frozen=True)
class ArrayItem:
    """An in-memory 8-bit grayscale image (digits, IDX): always valid, encoded by the shard writer."""

    id: str  # e.g. "digits:123" or "train-images-idx3-ubyte.gz:0"
    label: int
    pixels: np.ndarray  # (H, W) uint8


Item = FileItem | ArrayItem


@dataclass
class Rows:
    """Consecutive rows of a listing."""

    split: np.ndarray  # uint8 per row: index into LISTED_SPLITS
    label: np.ndarray  # int32 per row: label code, mapped to a class index by `SourceRows.remap` at the end
    ids: list[str]  # per row: the input's path relative to `Source.base`, or "digits:12" for in-memory images
    blocks: np.ndarray | None = None  # uint32 per row: its size in 512-byte blocks (only when sizes are asked for)
    pixels: np.ndarray | None = None  # uint8 [rows, H, W]: the images of in-memory sources


@dataclass(frozen=True)
class Source:
    """What a source spec names; `SourceRows` lists it."""

    spec: str  # "digits" or the resolved absolute path
    kind: str  # "digits", "idx", "folder" or "list"
    path: Path | None = None  # the list file or folder
    class_names: list[str] | None = None  # replaces the listed class names (same count)

    @property
    def base(self) -> Path | None:
        """The folder that file ids are relative to (None for in-memory images)."""
        return {"list": self.path and self.path.parent, "folder": self.path}.get(self.kind)

    def files(self) -> list[Path]:
        """The files whose content is the listing (a list file, IDX files): when they change, list again."""
        if self.kind == "list":
            return [self.path]
        if self.kind == "idx":
            return [path for pair in _idx_files(self.path).values() for path in pair]
        return []


def open_source(spec: str, class_names: list[str] | None = None) -> Source:
    """The source named by `spec` (see the module docstring), checked but not listed; `class_names` renames its
    classes. Raises VmoeError naming the path when it does not exist or is not a source."""
    if spec == "digits":
        return Source("digits", "digits", None, class_names)
    path = Path(spec).expanduser()
    if not path.exists():
        raise VmoeError(f"{spec}: no such file or folder (a source is a folder, a .csv/.tsv/.jsonl list, or 'digits')")
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".tsv", ".jsonl"):
            raise VmoeError(f"{path}: a list file must end in .csv, .tsv or .jsonl (or pass a folder, or 'digits')")
        return Source(str(path), "list", path, class_names)
    if _idx_files(path):
        return Source(str(path), "idx", path, class_names)
    _folder_layout(path)  # one line now when there are no class sub-folders
    return Source(str(path), "folder", path, class_names)


class SourceRows:
    """Iterating lists a source's rows, in chunks, in canonical order; then `classes` names its classes and `remap`
    (int32) gives the class index of each label code of the rows. `sizes`: also each input's size, in blocks."""

    def __init__(self, source: Source, sizes: bool = False) -> None:
        self.source, self.sizes = source, sizes
        self.classes: list[str] = []
        self.remap = np.zeros(0, np.int32)

    def __iter__(self) -> Iterator[Rows]:
        source, count = self.source, 0
        if source.kind == "list":
            codes = _Codes()
            for rows in _list_rows(source.path, codes, self.sizes):
                count += len(rows.ids)
                yield rows
            if not count:
                raise VmoeError(f"{source.path}: the list is empty")
            self.classes, self.remap = _list_classes(list(codes))
            return
        rows_of = {"digits": _digits, "idx": _idx, "folder": _folder}[source.kind]
        for rows in rows_of(source.path, self):  # sets self.classes; label codes are class indices
            count += len(rows.ids)
            yield rows
        if not count:
            raise VmoeError(f"{source.spec}: no images found")
        self.remap = np.arange(len(self.classes), dtype=np.int32)


class _Codes(dict):
    """Label text -> code, in order of first appearance."""

    def __missing__(self, key: str) -> int:
        code = self[key] = len(self)
        return code


def _list_classes(labels: list[str]) -> tuple[list[str], np.ndarray]:
    """A list file's classes: integer labels are kept as given, others become the indices of their sorted values."""
    if all(re.fullmatch(r"\d+", label) for label in labels):
        index = [int(label) for label in labels]
        classes = [str(c) for c in range(max(index) + 1)]
    else:
        order = {label: i for i, label in enumerate(sorted(labels))}
        index, classes = [order[label] for label in labels], sorted(labels)
    return classes, np.array(index, dtype=np.int32)


def _digits(_: None, out: SourceRows) -> Iterator[Rows]:
    """scikit-learn's digits: 8x8 values 0..16 become 8-bit pixels round(v * 255 / 16), all in 'train'."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)
    out.classes = [str(c) for c in range(10)]
    ids = [f"digits:{i}" for i in range(len(pixels))]
    yield Rows(np.zeros(len(ids), np.uint8), digits.target.astype(np.int32), ids, _array_blocks(pixels), pixels)


def _array_blocks(pixels: np.ndarray) -> np.ndarray:
    """512-byte blocks of each image's raw pixels (what --shard-bytes plans with for in-memory images)."""
    return np.full(len(pixels), -(-pixels[0].size // 512) if len(pixels) else 0, np.uint32)


def _idx_files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Split -> (images, labels) IDX files found in `folder`, gzipped or not."""
    found = {}
    for images in sorted(folder.glob("*-images-idx3-ubyte*")):
        prefix = images.name.split("-images-")[0]
        labels = images.with_name(images.name.replace("-images-idx3-", "-labels-idx1-"))
        if prefix in IDX_PREFIXES and labels.is_file():
            found[IDX_PREFIXES[prefix]] = (images, labels)
    return found


def _idx(folder: Path, out: SourceRows) -> Iterator[Rows]:
    """An MNIST-style IDX folder; Fashion-MNIST class names when the path says 'fashion'."""
    files = _idx_files(folder)
    arrays = {}
    for split in (s for s in LISTED_SPLITS if s in files):
        images_path, labels_path = files[split]
        images, labels = _read_idx(images_path, ndim=3), _read_idx(labels_path, ndim=1)
        if len(images) != len(labels):
            raise VmoeError(f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)} labels")
        arrays[split] = (images_path.name, images, labels.astype(np.int32))
    num_classes = max((int(labels.max()) + 1 for _, _, labels in arrays.values() if len(labels)), default=0)
    out.classes = [str(c) for c in range(num_classes)]
    if "fashion" in str(folder).lower() and num_classes <= len(FASHION_MNIST_CLASSES):
        out.classes = FASHION_MNIST_CLASSES[:num_classes]
    for split, (name, images, labels) in arrays.items():
        code = np.full(len(labels), LISTED_SPLITS.index(split), np.uint8)
        yield Rows(code, labels, [f"{name}:{i}" for i in range(len(labels))], _array_blocks(images), images)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array (magic 0x0000 08 ndim, big-endian int32 sizes, then the data)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise VmoeError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if len(data) < 4 + 4 * ndim or data[:4] != bytes([0, 0, 8, ndim]):
        raise VmoeError(f"{path}: not an unsigned-byte IDX file with {ndim} dimension(s)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise VmoeError(f"{path}: truncated or oversized: header says {shape}, found {len(body)} data bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _folder_layout(root: Path) -> tuple[dict[str, str], list[str]]:
    """Split -> sub-folder holding it ('' for the root itself), and the class names (sorted sub-folder names)."""
    subdirs = _subdirs(root)
    if "train" in subdirs and any(name in SPLIT_NAMES and name != "train" for name in subdirs):
        trees = {SPLIT_NAMES[name]: name for name in subdirs if name in SPLIT_NAMES}
    else:
        trees = {"train": ""}
    classes = sorted({name for tree in trees.values() for name in _subdirs(root / tree)})
    if not classes:
        raise VmoeError(f"{root}: no class sub-folders (expected ROOT/CLASS/IMAGE, or ROOT/train/CLASS/IMAGE)")
    return trees, classes


def _folder(root: Path, out: SourceRows) -> Iterator[Rows]:
    """One sub-folder per class; under `train/` and `val/` (or `test/`) when those exist. Ids are relative to
    `root`; within a class, files come in sorted path order."""
    trees, out.classes = _folder_layout(root)
    for code, split in enumerate(LISTED_SPLITS):
        if split not in trees:
            continue
        prefix = f"{trees[split]}/" if trees[split] else ""
        ids, labels, blocks = [], [], []
        for label, name in enumerate(out.classes):
            for rel, entry in _walk(root / prefix / name, f"{prefix}{name}/"):
                ids.append(rel)
                labels.append(label)
                if out.sizes:
                    blocks.append(_entry_blocks(entry))
                if len(ids) == CHUNK:
                    yield _rows(code, ids, labels, blocks, out.sizes)
                    ids, labels, blocks = [], [], []
        if ids:
            yield _rows(code, ids, labels, blocks, out.sizes)


def _rows(code: int, ids: list[str], labels: list[int], blocks: list[int], sizes: bool) -> Rows:
    split = np.full(len(ids), code, np.uint8)
    return Rows(split, np.array(labels, np.int32), ids, np.array(blocks, np.uint32) if sizes else None)


def _subdirs(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders of `folder`."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise VmoeError(f"{folder}: cannot list ({e.strerror})") from None


def _walk(folder: Path | str, prefix: str) -> Iterator[tuple[str, os.DirEntry]]:
    """(prefix + path below `folder`, entry) of every visible file below `folder`, in sorted path order (a folder
    that is missing or cannot be listed has none). Like os.walk, a symlink to a folder is not followed."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if not entry.is_dir():
            yield prefix + entry.name, entry
        elif not entry.is_symlink():
            yield from _walk(entry.path, f"{prefix}{entry.name}/")


def _entry_blocks(entry: os.DirEntry) -> int:
    try:
        return -(-entry.stat().st_size // 512)
    except OSError:
        return 0  # it will be skipped when read


def _list_rows(path: Path, codes: _Codes, sizes: bool) -> Iterator[Rows]:
    """A .csv, .tsv or .jsonl list: path and label columns, optional split column (train/val/test)."""
    jsonl = path.suffix.lower() == ".jsonl"
    try:
        with open(path, encoding="utf-8", newline=None if jsonl else "") as f:
            reader = _jsonl_columns(path, f) if jsonl else _csv_columns(path, f)
            for files, labels, splits in reader:
                split = np.zeros(len(files), np.uint8) if splits is None else _split_codes(path, splits, jsonl)
                label = np.fromiter(map(codes.__getitem__, labels), np.int32, len(labels))
                blocks = np.array([_file_blocks(path.parent / f) for f in files], np.uint32) if sizes else None
                yield Rows(split, label, files, blocks)
    except UnicodeDecodeError:
        raise VmoeError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise VmoeError(f"{path}: cannot read ({e.strerror})") from None


def _file_blocks(path: Path) -> int:
    try:
        return -(-path.stat().st_size // 512)
    except (OSError, ValueError):
        return 0  # it will be skipped when read


def _split_codes(path: Path, splits: list[str], jsonl: bool) -> np.ndarray:
    """uint8 codes of the split values of a chunk ('' is train); an unknown value is one error line."""
    known = {value: LISTED_SPLITS.index(SPLIT_NAMES.get(value.lower(), "train")) for value in set(splits)}
    for value in known:
        if value and value.lower() not in SPLIT_NAMES:
            row = splits.index(value)
            raise VmoeError(f"{path}:{_line(path, jsonl, row)}: unknown split {value!r} (expected train, val or test)")
    return np.fromiter(map(known.__getitem__, splits), np.uint8, len(splits))


class _Columns:
    """Where the path, label and split columns are, and the running row count (for error lines)."""

    def __init__(self, path: Path, names: list[str], jsonl: bool) -> None:
        self.path, self.jsonl, self.seen = path, jsonl, 0
        self.file = next((c for c in PATH_COLUMNS if c in names), None)
        self.label = next((c for c in LABEL_COLUMNS if c in names), None)
        if self.file is None or self.label is None:
            missing = "path" if self.file is None else "label"
            wanted = PATH_COLUMNS if self.file is None else LABEL_COLUMNS
            raise VmoeError(f"{path}: no {missing} column (expected one of: {', '.join(wanted)})")

    def check(self, files: list[str], labels: list[str]) -> None:
        """One error line for the first row with no path or no label."""
        bad = [(values.index(""), name) for values, name in ((files, self.file), (labels, self.label)) if "" in values]
        if bad:
            row, name = min(bad)
            raise VmoeError(f"{self.path}:{_line(self.path, self.jsonl, self.seen + row)}: missing {name}")


def _csv_columns(path: Path, f: IO[str]) -> Iterator[tuple[list[str], list[str], list[str] | None]]:
    """(paths, labels, splits or None) per chunk of a CSV/TSV list with a header; '' where a value is missing."""
    reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        index = {name: i for i, name in enumerate(header) if name}  # a repeated column: the last one, as DictReader
        columns = _Columns(path, list(index), jsonl=False)
        wanted = [index[columns.file], index[columns.label], index.get("split", -1)]
        width = max(wanted) + 1
        while chunk := list(islice(reader, CHUNK)):
            rows = [row for row in chunk if row]
            if rows and min(map(len, rows)) < width:
                rows = [row + [""] * (width - len(row)) for row in rows]
            files, labels = list(map(itemgetter(wanted[0]), rows)), list(map(itemgetter(wanted[1]), rows))
            columns.check(files, labels)
            yield files, labels, list(map(itemgetter(wanted[2]), rows)) if wanted[2] >= 0 else None
            columns.seen += len(rows)
    except csv.Error as e:
        raise VmoeError(f"{path}:{reader.line_num}: {e}") from None


def _jsonl_columns(path: Path, f: IO[str]) -> Iterator[tuple[list[str], list[str], list[str] | None]]:
    """(paths, labels, splits) per chunk of a JSON Lines list (one object per line, keys in any case)."""
    columns, line = None, 0
    while lines := list(islice(f, CHUNK)):
        texts = [text for text in lines if text.strip()]
        objects = _parse_jsonl(path, texts, lines, line)
        line += len(lines)
        layouts = set(map(tuple, objects))
        if len(layouts) == 1:
            keys = {str(k).lower(): k for k in next(iter(layouts))}
        else:  # keys spelt differently from row to row
            objects, keys = [{str(k).lower(): v for k, v in o.items()} for o in objects], None
        if columns is None and objects:
            columns = _Columns(path, [str(k).lower() for k in objects[0]], jsonl=True)
        if columns is None:
            continue
        values = [[o.get(keys.get(name) if keys else name) for o in objects] for name in (columns.file, columns.label)]
        files, labels = (["" if v is None else str(v) for v in column] for column in values)
        columns.check(files, labels)
        split_key = keys.get("split") if keys else "split"
        yield files, labels, [str(o.get(split_key) or "") for o in objects]
        columns.seen += len(objects)


def _parse_jsonl(path: Path, texts: list[str], lines: list[str], first_line: int) -> list[dict[str, Any]]:
    """The objects of a chunk's non-blank lines, parsed together; a bad line is one error naming it."""
    try:
        objects = json.loads("[" + ",".join(texts) + "]")
        if len(objects) == len(texts) and all(type(o) is dict for o in objects):
            return objects
    except ValueError:
        pass
    for n, text in enumerate(lines, first_line + 1):  # find the bad line
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise VmoeError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise VmoeError(f"{path}:{n}: expected a JSON object per line")
    raise AssertionError("a chunk that does not parse has a bad line")


def _line(path: Path, jsonl: bool, row: int) -> int:
    """The line number of data row `row` (0-based, blank lines not counted) of a list file: for error messages."""
    with open(path, encoding="utf-8", newline=None if jsonl else "") as f:
        if jsonl:
            return [n for n, text in enumerate(f, 1) if text.strip()][row]
        reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        next(reader, None)
        for _ in islice((r for r in reader if r), row + 1):
            pass
        return reader.line_num
