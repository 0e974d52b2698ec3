"""The manifest of a shard directory: its file name and formats, its one reader, and its verification.

`vmoe shard` (data/shard.py) writes `manifest.json` last, so its presence means the shards are complete. The
loader, `vmoe shard-info` and the evaluation commands all read it through `read_manifest`.

Two formats. A `vmoe-shards/1` manifest names tars inside its own folder: a shard folder is untrusted, so a
name leading out of it (an absolute path, `..`, a symlink) is refused. A `vmoe-index/1` manifest, written by
`vmoe shard-index` (data/index.py), names shards where they already are: absolute paths, URLs and `pipe:`
commands, which run in a shell. So an index is read only when it carries an HMAC of its content made with this
user's own key (`index_key_file()`, created on first use, mode 600): an index the user made is used as it is;
one from anywhere else, or edited, could name any file or command and is refused with one line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from vmoe_cli.data import tars
from vmoe_cli.errors import VmoeError
from vmoe_cli.progress import ProgressFn

MANIFEST = "manifest.json"
FORMAT = "vmoe-shards/1"
INDEX_FORMAT = "vmoe-index/1"
STATE_DIR = ".vmoe-shard"  # job.json and one record per finished shard; removed once the manifest is written


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """The manifest of a vmoe shard directory or index; VmoeError naming the directory when it is not a finished
    one, and the manifest and the entry when a shard entry lacks its file, count or bytes, or names a file
    outside a shard folder, or when an index is not signed by this user's key."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        if (Path(shard_dir) / STATE_DIR).is_dir():
            raise VmoeError(
                f"{shard_dir}: unfinished shards (no {MANIFEST}); rerun the `vmoe shard` command that wrote them"
            )
        check_not_stock_tars(str(shard_dir))
        raise VmoeError(f"{shard_dir}: not a vmoe shard directory (no {MANIFEST}); create one with `vmoe shard`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VmoeError(f"{path}: unreadable manifest ({e}); re-run `vmoe shard`") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, INDEX_FORMAT):
        raise VmoeError(f"{path}: not a {FORMAT} or {INDEX_FORMAT} manifest; re-run `vmoe shard`")
    index = manifest["format"] == INDEX_FORMAT
    if index:
        _check_index(path, manifest)
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
        raise VmoeError(f"{path}: 'splits' is not a mapping of split names to splits; {remedy(manifest)}")
    folder = None if index else Path(shard_dir).resolve()
    for split, info in splits.items():
        shards = info.get("shards")
        if not isinstance(shards, list):
            raise VmoeError(f"{path}: split {split!r} has no list of 'shards'; {remedy(manifest)}")
        for shard in shards:
            _check_entry(path, split, shard, folder)
    return manifest


def shard_location(shard_dir: str | Path, manifest: dict[str, Any], shard: dict[str, Any]) -> str:
    """Where a manifest's shard entry is read from: a shard folder's file, or an index's path, URL or command."""
    return shard["file"] if manifest["format"] == INDEX_FORMAT else str(Path(shard_dir) / shard["file"])


def remedy(manifest: dict[str, Any]) -> str:
    """What to run when shards no longer match their manifest."""
    return "re-index with `vmoe shard-index`" if manifest.get("format") == INDEX_FORMAT else "re-run `vmoe shard`"


def check_not_stock_tars(spec: str) -> None:
    """A one-line VmoeError saying how to index them when `spec` names WebDataset tars without a vmoe manifest:
    a folder of tars, a tar, a brace pattern or a URL."""
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / MANIFEST).exists() and next(path.glob("*.tar"), None) is not None:
        raise VmoeError(
            f"{spec}: no {MANIFEST}, but WebDataset tars: index them where they are with "
            f"`vmoe shard-index {Path(spec) / '*.tar'} --out INDEX` and use INDEX"
        )
    tar_like = spec.endswith((".tar", ".tar.gz", ".tgz")) or tars.scheme(spec) != ""
    if tar_like and not path.is_dir():
        raise VmoeError(
            f"{spec}: WebDataset tars are read through an index; create one with "
            f"`vmoe shard-index '{spec}' --out INDEX` and use INDEX"
        )


def index_key_file() -> Path:
    """This user's key for signing indexes: `$XDG_CONFIG_HOME/vmoe/index.key` (`~/.config/vmoe/index.key`).
    Copy it to the machines that read the user's indexes when they do not share the home folder."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "vmoe" / "index.key"


def sign_index(manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` with its `signature`, made with this user's key (created on first use)."""
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    return {**unsigned, "signature": _signature(unsigned, _index_key(create=True))}


def _signature(unsigned: dict[str, Any], key: bytes) -> str:
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def _index_key(create: bool) -> bytes | None:
    """The key's bytes; with `create`, a new random key is written first when there is none (mode 600; of two
    processes creating it at once, the first link wins and both use it)."""
    path = index_key_file()
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        return path.read_text().strip().encode()
    except OSError:
        return None


def signed_by_this_user(document: dict[str, Any]) -> bool:
    """Whether `document`'s `signature` is this user's key's signature of the rest of it."""
    key, given = _index_key(create=False), document.get("signature")
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    return key is not None and isinstance(given, str) and hmac.compare_digest(given, _signature(unsigned, key))


def _check_index(path: Path, manifest: dict[str, Any]) -> None:
    """An index is read only when this user's key signed it (it may name any file or command), and its label key
    is a string or null."""
    if not signed_by_this_user(manifest):
        raise VmoeError(
            f"{path}: an index not made by this user's `vmoe shard-index` (its signature does not match "
            f"{index_key_file()}); an index may name any file or command, so re-create it with `vmoe shard-index`"
        )
    if not isinstance(manifest.get("label_key"), str | None):
        raise VmoeError(f"{path}: 'label_key' must be a string or null; {remedy(manifest)}")


def _check_entry(path: Path, split: str, shard: Any, folder: Path | None) -> None:
    """A shard entry gives a file name, a sample count and a size, and (unless `folder` is None: an index) its
    file lies inside `folder` once resolved: no absolute path, no `..`, no symlink leading out."""
    if not _well_formed(shard):
        raise VmoeError(
            f"{path}: split {split!r}: shard entry {shard!r} needs a file name and whole-number count and bytes; "
            "re-run `vmoe shard`"
        )
    if folder is None:
        return
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
    out_dir: str | Path,
    verify: bool = False,
    ranks: int = 1,
    workers: int = 1,
    train_split: str = "train",
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Counts per split and class, and problems: missing or (with `verify`) corrupt shards, empty shards, and
    shards of `train_split` that do not spread evenly over `ranks` x `workers` readers (the loader divides the
    other, evaluation, splits by sample, so their shard count does not matter). With `verify`, `progress` is
    told the bytes hashed after each shard.

    Returns {"manifest": ..., "problems": [str], "failed": [str], "unchecked": int}; `failed` lists shards that
    are missing, the wrong size, or (with `verify`) whose sha256 differs from the manifest's; `unchecked` counts
    remote shards, whose size only `verify` checks (by streaming them).
    """
    if ranks < 1 or workers < 1:
        raise VmoeError(f"--ranks and --workers must be at least 1, got {ranks} and {workers}")
    manifest = read_manifest(out_dir)
    problems, failed, unchecked = [], [], 0
    hashed, to_hash = 0, sum(s["bytes"] or 0 for info in manifest["splits"].values() for s in info["shards"])
    show = progress if verify and progress is not None else None
    if show is not None:
        show(f"sha256 {out_dir}", 0, to_hash, "bytes")
    for split, info in manifest["splits"].items():
        problems += _spread_problems(split, info["shards"], ranks, workers, split == train_split)
        for shard in info["shards"]:
            location = shard_location(out_dir, manifest, shard)
            if tars.local_path(location) is None and not verify:
                unchecked += 1
                continue
            reason = _shard_problem(location, shard, verify)
            if reason:
                failed.append(f"{shard['file']}: {reason}")
            hashed += shard["bytes"] or 0
            if show is not None:
                show(f"sha256 {out_dir}", hashed, to_hash, "bytes")
    return {"manifest": manifest, "problems": problems, "failed": failed, "unchecked": unchecked}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _spread_problems(split: str, shards: list[dict[str, Any]], ranks: int, workers: int, train: bool) -> list[str]:
    """How a training split's shards spread badly over `ranks` x `workers` readers, and any split's empty shards."""
    readers = ranks * workers
    problems = []
    if train and len(shards) < readers:
        problems.append(
            f"{split}: {len(shards)} shards for {ranks} ranks x {workers} workers: {readers - len(shards)} "
            "readers get no shard (use fewer workers, or reshard with a smaller --shard-size)"
        )
    elif train and len(shards) % readers:
        problems.append(
            f"{split}: {len(shards)} shards over {readers} readers: some read {len(shards) // readers + 1}, "
            f"others {len(shards) // readers} (use a fixed epoch length, or reshard)"
        )
    per_rank = [sum(s["count"] for s in shards[r::ranks]) for r in range(ranks)]
    if train and ranks > 1 and min(per_rank) != max(per_rank):
        problems.append(f"{split}: samples per rank range from {min(per_rank)} to {max(per_rank)}")
    empty = [s["file"] for s in shards if s["count"] == 0]
    if empty:
        problems.append(f"{split}: {len(empty)} empty shard(s): {', '.join(empty[:3])}")
    return problems


def _shard_problem(location: str, shard: dict[str, Any], verify: bool) -> str:
    """Why a shard does not match its manifest entry ('' when it does). A local file's size is its stat; a remote
    shard is streamed (with `verify` only) and its bytes counted. The sha256 is checked with `verify` when the
    manifest has one (an index made without --sha256 has none)."""
    path = tars.local_path(location)
    if path is not None:
        try:
            size = path.stat().st_size
        except OSError:
            return "missing"
        if size != shard["bytes"]:
            return f"{size} bytes, the manifest says {shard['bytes']}"
        if verify and "sha256" in shard and file_sha256(path) != shard["sha256"]:
            return "sha256 differs from the manifest's"
        return ""
    try:
        with tars.open_stream(location, hashed="sha256" in shard) as stream:
            stream.drain()
    except VmoeError as e:
        return str(e)
    if stream.bytes != shard["bytes"]:
        return f"{stream.bytes} bytes, the manifest says {shard['bytes']}"
    if stream.sha256() not in (None, shard.get("sha256")):
        return "sha256 differs from the manifest's"
    return ""
