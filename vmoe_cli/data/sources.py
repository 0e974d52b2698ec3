"""Image sources: what `vmoe shard` reads, as per-split lists of items in a canonical order.

A source is one of: the name `digits` (scikit-learn's 1,797 embedded 8x8 digits); an MNIST-style
IDX folder (`train-images-idx3-ubyte[.gz]` + `train-labels-idx1-ubyte[.gz]`, `t10k-*` for test);
a folder tree with one sub-folder per class (optionally under `train/` and `val/` or `test/`);
or a list file (.csv, .tsv, .jsonl) with a path and a label column, paths relative to the file.

Listing only names the inputs: no image is opened here. Items are small and picklable, so the
shard writer can send them to worker processes, where each one is read and validated.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmoe_cli.errors import VmoeError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
PATH_COLUMNS = ("path", "file", "filename", "image")
LABEL_COLUMNS = ("label", "class")
SPLIT_NAMES = {"train": "train", "test": "test", "val": "test", "valid": "test", "validation": "test"}
IDX_PREFIXES = {"train": "train", "t10k": "test", "test": "test"}


@dataclass(frozen=True)
class FileItem:
    """An image file on disk; its bytes are read (and validated) by the shard writer."""

    id: str  # path relative to the source, as the user knows it
    label: int
    path: Path  # absolute


@dataclass(frozen=True)
class ArrayItem:
    """An in-memory 8-bit grayscale image (digits, IDX): always valid, encoded by the shard writer."""

    id: str  # e.g. "digits:123" or "train-images-idx3-ubyte.gz:0"
    label: int
    pixels: np.ndarray  # (H, W) uint8


Item = FileItem | ArrayItem


@dataclass
class Source:
    """What a source spec names: class names and, per split ('train', 'test'), its items in a canonical order."""

    spec: str  # "digits" or the resolved absolute path
    kind: str  # "digits", "idx", "folder" or "list"
    classes: list[str]
    splits: dict[str, list[Item]]


def open_source(spec: str, class_names: list[str] | None = None) -> Source:
    """List the images named by `spec` (see the module docstring); `class_names` renames the classes.

    Raises VmoeError naming the path when the source does not exist, has no images or cannot be parsed.
    """
    if spec == "digits":
        source = _digits()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise VmoeError(
                f"{spec}: no such file or folder (a source is a folder, a .csv/.tsv/.jsonl list, or 'digits')"
            )
        path = path.resolve()
        if path.is_file():
            source = _list_file(path)
        elif _idx_files(path):
            source = _idx(path)
        else:
            source = _folder(path)
    if class_names is not None:
        if len(class_names) != len(source.classes):
            raise VmoeError(f"--class-names: {spec} has {len(source.classes)} classes, got {len(class_names)} names")
        source.classes = list(class_names)
    if not any(source.splits.values()):
        raise VmoeError(f"{spec}: no images found")
    return source


def _digits() -> Source:
    """scikit-learn's digits: 8x8 values 0..16 become 8-bit pixels round(v * 255 / 16), all in 'train'."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)
    items = [ArrayItem(f"digits:{i}", int(y), pixels[i]) for i, y in enumerate(digits.target)]
    return Source("digits", "digits", [str(c) for c in range(10)], {"train": items})


def _idx_files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Split -> (images, labels) IDX files found in `folder`, gzipped or not."""
    found = {}
    for images in sorted(folder.glob("*-images-idx3-ubyte*")):
        prefix = images.name.split("-images-")[0]
        labels = images.with_name(images.name.replace("-images-idx3-", "-labels-idx1-"))
        if prefix in IDX_PREFIXES and labels.is_file():
            found[IDX_PREFIXES[prefix]] = (images, labels)
    return found


def _idx(folder: Path) -> Source:
    """An MNIST-style IDX folder; Fashion-MNIST class names when the path says 'fashion'."""
    splits = {}
    num_classes = 0
    for split, (images_path, labels_path) in _idx_files(folder).items():
        images = _read_idx(images_path, ndim=3)
        labels = _read_idx(labels_path, ndim=1)
        if len(images) != len(labels):
            raise VmoeError(f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)} labels")
        num_classes = max(num_classes, int(labels.max()) + 1 if len(labels) else 0)
        splits[split] = [ArrayItem(f"{images_path.name}:{i}", int(y), images[i]) for i, y in enumerate(labels)]
    classes = [str(c) for c in range(num_classes)]
    if "fashion" in str(folder).lower() and num_classes <= len(FASHION_MNIST_CLASSES):
        classes = FASHION_MNIST_CLASSES[:num_classes]
    return Source(str(folder), "idx", classes, splits)


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


def _folder(root: Path) -> Source:
    """One sub-folder per class; under `train/` and `val/` (or `test/`) when those exist."""
    subdirs = _subdirs(root)
    if "train" in subdirs and any(name in SPLIT_NAMES and name != "train" for name in subdirs):
        trees = {SPLIT_NAMES[name]: root / name for name in subdirs if name in SPLIT_NAMES}
    else:
        trees = {"train": root}
    classes = sorted({name for tree in trees.values() for name in _subdirs(tree)})
    if not classes:
        raise VmoeError(f"{root}: no class sub-folders (expected ROOT/CLASS/IMAGE, or ROOT/train/CLASS/IMAGE)")
    splits = {}
    for split, tree in trees.items():
        items = []
        for label, name in enumerate(classes):
            for path in _files_under(tree / name):
                items.append(FileItem(path.relative_to(root).as_posix(), label, path))
        splits[split] = items
    return Source(str(root), "folder", classes, splits)


def _subdirs(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders of `folder`."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise VmoeError(f"{folder}: cannot list ({e.strerror})") from None


def _files_under(folder: Path) -> list[Path]:
    """Every visible file below `folder`, sorted (a missing folder has none)."""
    if not folder.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(found)


def _list_file(path: Path) -> Source:
    """A .csv, .tsv or .jsonl list: path and label columns, optional split column (train/val/test)."""
    rows = _read_rows(path)
    if not rows:
        raise VmoeError(f"{path}: the list is empty")
    header = rows[0][1].keys()
    path_col = next((c for c in PATH_COLUMNS if c in header), None)
    label_col = next((c for c in LABEL_COLUMNS if c in header), None)
    if path_col is None or label_col is None:
        missing = "path" if path_col is None else "label"
        wanted = PATH_COLUMNS if path_col is None else LABEL_COLUMNS
        raise VmoeError(f"{path}: no {missing} column (expected one of: {', '.join(wanted)})")
    entries = []
    for line, row in rows:
        file, label, split = row.get(path_col), row.get(label_col), row.get("split") or "train"
        if file in (None, "") or label in (None, ""):
            raise VmoeError(f"{path}:{line}: missing {path_col if file in (None, '') else label_col}")
        if str(split).lower() not in SPLIT_NAMES:
            raise VmoeError(f"{path}:{line}: unknown split {split!r} (expected train, val or test)")
        entries.append((str(file), str(label), SPLIT_NAMES[str(split).lower()]))
    labels = sorted({label for _, label, _ in entries})
    if all(re.fullmatch(r"\d+", label) for label in labels):
        index = {label: int(label) for label in labels}
        classes = [str(c) for c in range(max(index.values()) + 1)]
    else:
        index = {label: i for i, label in enumerate(labels)}
        classes = labels
    splits: dict[str, list[Item]] = {}
    for file, label, split in entries:
        splits.setdefault(split, []).append(FileItem(file, index[label], (path.parent / file).resolve()))
    return Source(str(path), "list", classes, splits)


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row dict) for each row of a .csv, .tsv or .jsonl list file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise VmoeError(f"{path}: a list file must end in .csv, .tsv or .jsonl (or pass a folder, or 'digits')")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VmoeError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise VmoeError(f"{path}: cannot read ({e.strerror})") from None
    if suffix != ".jsonl":
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        return [(reader.line_num, {k.strip().lower(): v for k, v in row.items() if k}) for row in reader]
    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise VmoeError(f"{path}:{line}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise VmoeError(f"{path}:{line}: expected a JSON object per line")
        rows.append((line, {str(k).lower(): v for k, v in row.items()}))
    return rows
