"""The manifest of a shard directory: its file name and format, its one reader, and its verification.

`vmoe shard` (data/shard.py) writes `manifest.json` last, so its presence means the shards are complete. The
loader, `vmoe shard-info` and the evaluation commands all read it through `read_manifest`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vmoe_cli.errors import VmoeError
from vmoe_cli.progress import ProgressFn

MANIFEST = "manifest.json"
FORMAT = "vmoe-shards/1"
STATE_DIR = ".vmoe-shard"  # job.json and one record per finished shard; removed once the manifest is written


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """The manifest of a vmoe shard directory; VmoeError naming the directory when it is not a finished one, and
    the manifest and the entry when a shard entry lacks its file, count or bytes, or names a file outside it."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        if (Path(shard_dir) / STATE_DIR).is_dir():
            raise VmoeError(
                f"{shard_dir}: unfinished shards (no {MANIFEST}); rerun the `vmoe shard` command that wrote them"
            )
        raise VmoeError(f"{shard_dir}: not a vmoe shard directory (no {MANIFEST}); create one with `vmoe shard`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VmoeError(f"{path}: unreadable manifest ({e}); re-run `vmoe shard`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VmoeError(f"{path}: not a {FORMAT} manifest; re-run `vmoe shard`")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
        raise VmoeError(f"{path}: 'splits' is not a mapping of split names to splits; re-run `vmoe shard`")
    folder = Path(shard_dir).resolve()
    for split, info in splits.items():
        shards = info.get("shards")
        if not isinstance(shards, list):
            raise VmoeError(f"{path}: split {split!r} has no list of 'shards'; re-run `vmoe shard`")
        for shard in shards:
            _check_entry(path, split, shard, folder)
    return manifest


def _check_entry(path: Path, split: str, shard: Any, folder: Path) -> None:
    """A shard entry gives a file name, a sample count and a size, and its file lies inside `folder` once
    resolved: no absolute path, no `..`, no symlink leading out."""
    if not _well_formed(shard):
        raise VmoeError(
            f"{path}: split {split!r}: shard entry {shard!r} needs a file name and whole-number count and bytes; "
            "re-run `vmoe shard`"
        )
    file = Path(shard["file"])
    try:
        inside = not file.is_absolute() and ".." not in file.parts and (folder / file).resolve().is_relative_to(folder)
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise VmoeError(
            f"{path}: split {split!r}: shard file {shard['file']!r} is outside the shard folder (an absolute path, "
            "'..' or a symlink leading out); shard files must lie in the folder"
        )


def _well_formed(shard: Any) -> bool:
    return (
        isinstance(shard, dict)
        and isinstance(shard.get("file"), str)
        and shard["file"] != ""
        and all(type(shard.get(key)) is int and shard[key] >= 0 for key in ("count", "bytes"))
    )


def shard_info(
    out_dir: str | Path, verify: bool = False, ranks: int = 1, workers: int = 1, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Counts per split and class, and problems: missing or (with `verify`) corrupt shards, shard counts
    that do not spread evenly over `ranks` x `workers` readers, empty shards. With `verify`, `progress` is told
    the bytes hashed after each shard.

    Returns {"manifest": ..., "problems": [str], "failed": [str]}; `failed` lists shards that are missing,
    the wrong size, or (with `verify`) whose sha256 differs from the manifest's.
    """
    if ranks < 1 or workers < 1:
        raise VmoeError(f"--ranks and --workers must be at least 1, got {ranks} and {workers}")
    manifest = read_manifest(out_dir)
    problems, failed = [], []
    hashed, to_hash = 0, sum(s["bytes"] for info in manifest["splits"].values() for s in info["shards"])
    show = progress if verify and progress is not None else None
    if show is not None:
        show(f"sha256 {out_dir}", 0, to_hash, "bytes")
    for split, info in manifest["splits"].items():
        problems += _spread_problems(split, info["shards"], ranks, workers)
        for shard in info["shards"]:
            reason = _shard_problem(Path(out_dir) / shard["file"], shard, verify)
            if reason:
                failed.append(f"{shard['file']}: {reason}")
            hashed += shard["bytes"]
            if show is not None:
                show(f"sha256 {out_dir}", hashed, to_hash, "bytes")
    return {"manifest": manifest, "problems": problems, "failed": failed}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _spread_problems(split: str, shards: list[dict[str, Any]], ranks: int, workers: int) -> list[str]:
    """How `split`'s shards spread badly over `ranks` x `workers` readers, and its empty shards."""
    readers = ranks * workers
    problems = []
    if len(shards) < readers:
        problems.append(
            f"{split}: {len(shards)} shards for {ranks} ranks x {workers} workers: {readers - len(shards)} "
            "readers get no shard (use fewer workers, or reshard with a smaller --shard-size)"
        )
    elif len(shards) % readers:
        problems.append(
            f"{split}: {len(shards)} shards over {readers} readers: some read {len(shards) // readers + 1}, "
            f"others {len(shards) // readers} (use a fixed epoch length, or reshard)"
        )
    per_rank = [sum(s["count"] for s in shards[r::ranks]) for r in range(ranks)]
    if ranks > 1 and min(per_rank) != max(per_rank):
        problems.append(f"{split}: samples per rank range from {min(per_rank)} to {max(per_rank)}")
    empty = [s["file"] for s in shards if s["count"] == 0]
    if empty:
        problems.append(f"{split}: {len(empty)} empty shard(s): {', '.join(empty[:3])}")
    return problems


def _shard_problem(path: Path, shard: dict[str, Any], verify: bool) -> str:
    """Why a shard file does not match its manifest entry ('' when it does)."""
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    if size != shard["bytes"]:
        return f"{size} bytes, the manifest says {shard['bytes']}"
    if verify and file_sha256(path) != shard["sha256"]:
        return "sha256 differs from the manifest's"
    return ""
