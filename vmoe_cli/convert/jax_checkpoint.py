"""Read the official V-MoE checkpoints (google-research/vmoe `checkpoints.partitioned`) with msgpack and numpy.

A checkpoint is `PREFIX.index` plus `PREFIX.data-NNNNN-of-MMMMM` shards, all msgpack:

- the index is a map `{shard_count, version, index}`; `index` mirrors the parameter tree and each
  leaf is ExtType 8 holding `[shaped_array, [slice_nd, ...], [shard ids]]`, shaped_array being
  `[shape, dtype name, weak_type, {}]`. Checkpoints written before 2022-06-22 have no `version`;
  their index has the same layout, only the official reader needs a target tree for them.
- a data shard is a map `{MAGIC: True, "<leaf id>": [[[flat subchunk ndarrays], slice_nd], ...]}`,
  the leaf id being the leaf's position in the tree flattened with sorted keys; an ndarray is
  ExtType 1 holding `[shape, dtype name, C-order bytes]`, a slice_nd ExtType 6 holding packed
  `[start, stop, step]` triples.

Every array is assembled from its chunks and checked to be covered exactly; any problem is a
VmoeError naming the file.
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np

from vmoe_cli.errors import VmoeError

ARRAY_CHUNKS_MAGIC = "__msgpack_array_chunk_a87ca2__"
EXT_NDARRAY, EXT_SLICE_ND, EXT_INDEX_INFO = 1, 6, 8
KNOWN_VERSIONS = (None, "20220622")  # None: written before the versioned index


def read_jax_checkpoint(prefix: str | Path) -> tuple[dict[str, np.ndarray], str | None]:
    """All arrays of an official checkpoint by `/`-joined parameter name, and the index version."""
    prefix = str(prefix)
    index_file = Path(prefix + ".index")
    index = _unpack_file(index_file)
    if not isinstance(index, dict) or not isinstance(index.get("index"), dict) or "shard_count" not in index:
        raise VmoeError(f"{index_file}: not an official V-MoE checkpoint index (no 'index' tree and 'shard_count')")
    version = index.get("version")
    if version not in KNOWN_VERSIONS:
        raise VmoeError(f"{index_file}: unknown checkpoint version {version!r} (known: 20220622 and unversioned)")
    leaves = _flatten(index["index"])  # sorted keys at every level: the official leaf ids
    shapes = {}
    for name, info in leaves:
        if not isinstance(info, msgpack.ExtType) or info.code != EXT_INDEX_INFO:
            raise VmoeError(f"{index_file}: entry {name!r} is not an array description (ExtType 8)")
        shape, dtype = _shaped_array(msgpack.unpackb(info.data, raw=True)[0])
        shapes[name] = (shape, dtype)

    arrays = {name: np.zeros(shape, dtype=dtype) for name, (shape, dtype) in shapes.items()}
    filled = dict.fromkeys(arrays, 0)
    names = [name for name, _ in leaves]
    count = index["shard_count"]
    for shard in range(count):
        data_file = Path(f"{prefix}.data-{shard:05d}-of-{count:05d}")
        content = _unpack_file(data_file)
        if not isinstance(content, dict) or not content.get(ARRAY_CHUNKS_MAGIC):
            raise VmoeError(f"{data_file}: not an official checkpoint data shard (no array-chunks marker)")
        try:
            _place_chunks(content, names, arrays, filled)
        except (VmoeError, TypeError, ValueError) as e:
            raise VmoeError(f"{data_file}: {e}") from None
    short = [name for name, array in arrays.items() if filled[name] != array.size]
    if short:
        raise VmoeError(
            f"{prefix}: arrays not fully covered by the data shards: {', '.join(short[:5])}"
            f"{' ...' if len(short) > 5 else ''} (a missing or truncated shard?)"
        )
    return arrays, version


def _place_chunks(content: dict, names: list[str], arrays: dict[str, np.ndarray], filled: dict[str, int]) -> None:
    """Copy every chunk of one data shard into its array, counting the values placed."""
    for leaf_id, chunks in content.items():
        if leaf_id == ARRAY_CHUNKS_MAGIC:
            continue
        if not str(leaf_id).isdigit() or int(leaf_id) >= len(names):
            raise VmoeError(f"leaf id {leaf_id!r} is not in the index's {len(names)} arrays")
        name = names[int(leaf_id)]
        for subchunks, slice_nd in chunks:
            region = _slice_nd(slice_nd)
            flat = np.concatenate([_ndarray(sub) for sub in subchunks])
            extent = tuple(s.stop - s.start for s in region)
            if flat.size != int(np.prod(extent)):
                raise VmoeError(f"a chunk of {name!r} has {flat.size} values for extent {extent}")
            arrays[name][region] = flat.reshape(extent)
            filled[name] += flat.size


def _unpack_file(path: Path) -> object:
    """One msgpack object from a whole file; VmoeError naming the file when missing, truncated or not msgpack."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise VmoeError(f"{path}: no such file (an official checkpoint is PREFIX.index + PREFIX.data-*)") from None
    except OSError as e:
        raise VmoeError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, UnicodeDecodeError) as e:
        problem = type(e).__name__
        raise VmoeError(f"{path}: not a complete msgpack file ({problem}): truncated, or not a checkpoint") from None


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(path, leaf) pairs in sorted-key order, as jax.tree_util flattens a nested dict."""
    out = []
    for key in sorted(tree):
        value = tree[key]
        path = f"{prefix}{key}"
        out.extend(_flatten(value, path + "/") if isinstance(value, dict) else [(path, value)])
    return out


def _dtype(name: bytes | str) -> np.dtype:
    name = name.decode() if isinstance(name, bytes) else name
    if name == "bfloat16":  # no numpy dtype: read as float32 below
        return np.dtype(np.float32)
    try:
        return np.dtype(name)
    except TypeError:
        raise VmoeError(f"checkpoint array dtype {name!r} is not supported") from None


def _shaped_array(packed: bytes) -> tuple[tuple[int, ...], np.dtype]:
    shape, dtype_name, _weak_type, _ = msgpack.unpackb(packed, raw=True)
    return tuple(shape), _dtype(dtype_name)


def _ndarray(ext: msgpack.ExtType) -> np.ndarray:
    """ExtType 1 -> numpy array (bfloat16 widened to float32 exactly)."""
    if not isinstance(ext, msgpack.ExtType) or ext.code != EXT_NDARRAY:
        raise VmoeError("a chunk holds something that is not an array (ExtType 1)")
    shape, dtype_name, buffer = msgpack.unpackb(ext.data, raw=True)
    if dtype_name == b"bfloat16":
        bits = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(buffer, dtype=_dtype(dtype_name).newbyteorder("<")).reshape(shape)


def _slice_nd(ext: msgpack.ExtType) -> tuple[slice, ...]:
    """ExtType 6 -> tuple of slices with explicit start and stop."""
    if not isinstance(ext, msgpack.ExtType) or ext.code != EXT_SLICE_ND:
        raise VmoeError("a chunk position is not a slice (ExtType 6)")
    triples = [msgpack.unpackb(packed, raw=True) for packed in msgpack.unpackb(ext.data, raw=True)]
    return tuple(slice(start, stop, step) for start, stop, step in triples)
