"""`vmoe shard-index`: WebDataset tars that already exist (written by webdataset's ShardWriter, img2dataset, or
downloaded) scanned once, where they are, into an index manifest that every vmoe reader accepts.

Each shard is streamed once (data/tars.py), shards in parallel: its samples as the loader will read them, their
labels, its bytes and, on request, its sha256. Nothing is copied: the index names each shard by its absolute
path or URL, in the order given, and is signed with the user's key (data/manifest.py) because it may name any
file or command.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmoe_cli.atomic import write_text_atomic
from vmoe_cli.data import tars
from vmoe_cli.data.manifest import INDEX_FORMAT, MANIFEST, STATE_DIR, sign_index
from vmoe_cli.data.workers import spawn_pool
from vmoe_cli.errors import VmoeError

SPLIT_WORDS = ("train", "val", "validation", "test", "minival")  # split names recognised in shard names
REMEDY = "every sample needs an image and a label: a .cls member, or with --label-key KEY a .json member holding KEY"
ProgressFn = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class IndexOptions:
    """What `index_shards` reads from the tars and how it names what it finds."""

    split: str | None = None  # the split of every shard; None: the last split word in each shard's name
    label_key: str | None = None  # None: labels from each sample's .cls; else this key of its .json
    class_names: list[str] | None = None  # in label order; None: "0", "1", ... up to the largest label
    sha256: bool = True  # hash every shard: its identity for `shard-info --verify` and the feature caches


def split_of(location: str) -> str | None:
    """The split a shard's name says: the last of SPLIT_WORDS among the words of its file name and folder
    (`imagenet-train-000001.tar` -> train, `val/0001.tar` -> val); None when there is none."""
    tail = "/".join(location.lower().rstrip("/").split("/")[-2:])
    words = [w for w in re.split(r"[^a-z0-9]+", tail) if w in SPLIT_WORDS]
    return words[-1] if words else None


def index_shards(
    patterns: Sequence[str], out_dir: str | Path, options: IndexOptions, workers: int = 1,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Scan the shards of `patterns` (paths, brace patterns, URLs, `pipe:` commands) and write the signed index
    `out_dir/manifest.json`; returns the manifest. One-line VmoeError for a missing shard, a URL nobody can read,
    a sample without an image or label, or a shard name without a split (without `options.split`)."""
    out = Path(out_dir)
    _check_out(out)
    located = _locate(patterns, options.split)
    for _, location in located:
        tars.check_reader(location)
    records = _scan_all([location for _, location in located], options, workers, progress)
    manifest = _manifest(patterns, located, records, options)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / MANIFEST, json.dumps(sign_index(manifest), indent=1) + "\n")
    return manifest


def scan_shard(location: str, label_key: str | None, sha256: bool) -> dict[str, Any]:
    """One shard streamed once: its manifest entry (file, count, bytes, and sha256 when asked) and its labels'
    counts."""
    labels: Counter[int] = Counter()
    with tars.open_stream(location, hashed=sha256) as stream:
        for sample in tars.samples(stream, location, label_key, REMEDY):
            labels[sample["label"]] += 1
        stream.drain()
    entry = {"file": location, "count": sum(labels.values()), "bytes": stream.bytes}
    return {**entry, **({"sha256": stream.sha256()} if sha256 else {}), "labels": dict(labels)}


def _check_out(out: Path) -> None:
    """--out may be new, or any folder but a vmoe shard folder (whose manifest the index would replace)."""
    manifest = out / MANIFEST
    try:
        theirs = json.loads(manifest.read_text(encoding="utf-8")).get("format") if manifest.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        theirs = "unreadable"
    if (out / STATE_DIR).exists() or theirs not in (None, INDEX_FORMAT):
        raise VmoeError(f"--out {out}: holds vmoe shards or another {MANIFEST}; choose another folder for the index")


def _locate(patterns: Sequence[str], split: str | None) -> list[tuple[str, str]]:
    """(split, location) of every shard, in the order given; each location once."""
    if split is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
        raise VmoeError(f"--split: expected a name like train or test, got {split!r}")
    located, seen = [], set()
    for pattern in patterns:
        for location in tars.expand(pattern):
            if location in seen:
                raise VmoeError(f"{location}: given twice; name each shard once")
            seen.add(location)
            found = split or split_of(location)
            if found is None:
                raise VmoeError(
                    f"{location}: its name says no split ({', '.join(SPLIT_WORDS)}); give it with --split NAME"
                )
            located.append((found, location))
    if not located:
        raise VmoeError("no shards given")
    return located


def _scan_all(
    locations: list[str], options: IndexOptions, workers: int, progress: ProgressFn | None
) -> list[dict[str, Any]]:
    """`scan_shard` of every location, in order, over `workers` processes (1: in this process)."""
    scan = functools.partial(scan_shard, label_key=options.label_key, sha256=options.sha256)
    workers = max(1, min(workers, len(locations)))
    records = []
    with spawn_pool(workers) if workers > 1 else _InProcess() as pool:
        for record in pool.imap(scan, locations):
            records.append(record)
            if progress is not None:
                progress("indexing shards", len(records), len(locations))
    return records


class _InProcess:
    """The one method of a Pool that `_scan_all` uses, run in this process."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap(self, fn: Callable[[str], dict[str, Any]], items: list[str]) -> Any:
        return map(fn, items)


def _manifest(
    patterns: Sequence[str], located: list[tuple[str, str]], records: list[dict[str, Any]], options: IndexOptions
) -> dict[str, Any]:
    """The index: classes, and per split its count, class counts and shards, in the order given."""
    largest = max((label for r in records for label in r["labels"]), default=-1)
    if largest < 0:
        raise VmoeError(f"{patterns[0]}: no image samples in the given shards; {REMEDY}")
    names = options.class_names or [str(i) for i in range(largest + 1)]
    if len(names) <= largest:
        raise VmoeError(f"--class-names: {len(names)} names, but the shards have labels up to {largest}")
    if len(set(names)) != len(names):
        raise VmoeError("--class-names: a name is given twice; class names must differ")
    splits: dict[str, Any] = {}
    for (split, _), record in zip(located, records, strict=True):
        info = splits.setdefault(split, {"count": 0, "class_counts": Counter(), "shards": []})
        info["count"] += record["count"]
        info["class_counts"].update({names[label]: n for label, n in record["labels"].items()})
        info["shards"].append({k: v for k, v in record.items() if k != "labels"})
    for info in splits.values():
        info["class_counts"] = {name: info["class_counts"][name] for name in names}
    return {
        "format": INDEX_FORMAT, "source": "vmoe shard-index", "patterns": list(patterns),
        "label_key": options.label_key, "classes": names, "splits": splits,
    }  # fmt: skip
