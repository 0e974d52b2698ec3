"""`vmoe shard-index`: WebDataset tars that already exist (written by webdataset's ShardWriter, img2dataset, or
downloaded) scanned once, where they are, into an index manifest that every vmoe reader accepts.

Each shard is streamed once (data/tars.py), shards in parallel: its samples as the loader will read them, their
labels, its bytes and, on request, its sha256. Nothing is copied: the index names each shard by its absolute
path or URL, in the order given, and is signed with the user's key (data/manifest.py) because it may name any
file or command. Each shard's record is kept in `--out/.vmoe-index/` as soon as it is scanned, signed the same
way, so an interrupted or failed index is finished by the same command, scanning only the shards it lacks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmoe_cli.atomic import write_text_atomic
from vmoe_cli.data import tars
from vmoe_cli.data.manifest import INDEX_FORMAT, MANIFEST, STATE_DIR, sign_index, signed_by_this_user
from vmoe_cli.data.workers import spawn_pool
from vmoe_cli.errors import VmoeError

SPLIT_WORDS = ("train", "val", "validation", "test", "minival")  # split names recognised in shard names
REMEDY = "every sample needs an image and a label: a .cls member, or with --label-key KEY a .json member holding KEY"
RESUME_DIR = ".vmoe-index"  # one signed record per scanned shard while an index is made; removed once it is written
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
    progress: ProgressFn | None = None, say: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Scan the shards of `patterns` (paths, brace patterns, URLs, `pipe:` commands) and write the signed index
    `out_dir/manifest.json`; returns the manifest. Shards scanned by an earlier, unfinished run with the same
    options are not scanned again. One-line VmoeError for a missing shard, a URL nobody can read, a sample without
    an image or label, or a shard name without a split (without `options.split`)."""
    out = Path(out_dir)
    _check_out(out)
    located = _locate(patterns, options.split)
    for _, location in located:
        tars.check_reader(location)
    records = _scan_all([location for _, location in located], options, workers, progress, out / RESUME_DIR, say)
    manifest = _manifest(patterns, located, records, options)
    write_text_atomic(out / MANIFEST, json.dumps(sign_index(manifest), indent=1) + "\n")
    shutil.rmtree(out / RESUME_DIR, ignore_errors=True)
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
    locations: list[str], options: IndexOptions, workers: int, progress: ProgressFn | None, state: Path,
    say: Callable[[str], None] | None,
) -> list[dict[str, Any]]:  # fmt: skip
    """`scan_shard` of every location over `workers` processes (1: in this process), each record kept in `state`
    as soon as it is made; the records in the order given, those kept by an earlier run reused."""
    records = {i: r for i, loc in enumerate(locations) if (r := _kept_record(state, loc, options)) is not None}
    if records and say is not None:
        say(f"resuming: {len(records)} of {len(locations)} shards already indexed")
    todo = [(i, location) for i, location in enumerate(locations) if i not in records]
    scan = functools.partial(_scan_numbered, label_key=options.label_key, sha256=options.sha256)
    workers = max(1, min(workers, len(todo)))
    state.mkdir(parents=True, exist_ok=True)
    with spawn_pool(workers) if workers > 1 else _InProcess() as pool:
        for i, record in pool.imap_unordered(scan, todo):
            _keep_record(state, locations[i], options, record)
            records[i] = record
            if progress is not None:
                progress("indexing shards", len(records), len(locations))
    return [records[i] for i in range(len(locations))]


def _scan_numbered(numbered: tuple[int, str], label_key: str | None, sha256: bool) -> tuple[int, dict[str, Any]]:
    return numbered[0], scan_shard(numbered[1], label_key, sha256)


def _record_file(state: Path, location: str, options: IndexOptions) -> Path:
    name = json.dumps([location, options.label_key, options.sha256])
    return state / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.json"


def _identity(location: str, options: IndexOptions) -> list[Any]:
    """What a kept record must have been made from: the location, the options read, and a local file's size and
    modification time (a shard rewritten since is scanned again)."""
    path = tars.local_path(location)
    stat = path.stat() if path is not None else None
    return [location, options.label_key, options.sha256, stat and [stat.st_size, stat.st_mtime_ns]]


def _keep_record(state: Path, location: str, options: IndexOptions, record: dict[str, Any]) -> None:
    kept = sign_index({"identity": _identity(location, options), "record": record})
    write_text_atomic(_record_file(state, location, options), json.dumps(kept))


def _kept_record(state: Path, location: str, options: IndexOptions) -> dict[str, Any] | None:
    """The record an earlier run kept for `location`, or None (none, another shard or options, a changed file,
    not signed by this user, malformed: the shard is scanned again). Its file is `location` itself, never
    what the record says."""
    try:
        kept = json.loads(_record_file(state, location, options).read_text(encoding="utf-8"))
        if not signed_by_this_user(kept) or kept["identity"] != _identity(location, options):
            return None
        saved = kept["record"]
        record = {"file": location, "count": int(saved["count"]), "bytes": int(saved["bytes"])}
        if options.sha256:
            record["sha256"] = str(saved["sha256"])
        record["labels"] = {int(label): int(n) for label, n in saved["labels"].items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return record


class _InProcess:
    """The one method of a Pool that `_scan_all` uses, run in this process."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap_unordered(self, fn: Callable[[Any], Any], items: list[Any]) -> Any:
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
