"""WebDataset tars wherever they are: shard locations, brace patterns, one forward byte stream per location, and
the samples of that stream as the loader and `vmoe shard-index` both read them.

A location is a local path (or `file://`), an `http(s)://` URL (read with urllib), a `pipe:COMMAND` whose
standard output is the tar (the command runs in a shell, as in webdataset), or any other `scheme://` URL read
through fsspec when it and the scheme's backend (s3fs for `s3://`, gcsfs for `gs://`) are installed. Nothing
is read whole into memory: tarfile's stream mode reads one member after another. Samples are grouped by
webdataset's own functions, so the samples an index counts are those the loader and stock webdataset read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from vmoe_cli.errors import VmoeError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
HTTP_TIMEOUT_S = 60.0  # a stalled server is an error after this long, not a hang
CHUNK = 1 << 20


def expand(pattern: str) -> list[str]:
    """The locations of a shard pattern: brace-expanded (`train-{000000..000099}.tar`), local paths absolute."""
    return [loc if scheme(loc) else os.path.abspath(local_path(loc)) for loc in braceexpand.braceexpand(pattern)]


def scheme(location: str) -> str:
    """'' for a local path (and `file://`), 'pipe', 'http', 'https', or the URL's scheme (read by fsspec)."""
    if location.startswith("pipe:"):
        return "pipe"
    found = urlparse(location).scheme.lower()
    return "" if found in ("", "file") or len(found) == 1 else found  # one letter: a Windows drive


def local_path(location: str) -> Path | None:
    """The file of a local location; None for a URL or a command."""
    if scheme(location):
        return None
    return Path(urlparse(location).path if location.startswith("file:") else location)


def check_reader(location: str) -> None:
    """Fail early, with one line, when `location` is a local file that is missing or a URL whose reader is not
    installed."""
    kind, path = scheme(location), local_path(location)
    if path is not None and not path.is_file():
        raise VmoeError(f"{location}: no such shard file")
    if kind not in ("", "pipe", "http", "https"):
        _fsspec_filesystem(location, kind)


class Stream:
    """A forward byte stream of one location that counts, and optionally hashes, every byte read."""

    def __init__(self, raw: Any, hashed: bool):
        self._raw = raw
        self.bytes = 0
        self.eof = False
        self._hash = hashlib.sha256() if hashed else None

    def read(self, size: int = CHUNK) -> bytes:
        data = self._raw.read(size)
        self.bytes += len(data)
        self.eof = self.eof or not data
        if self._hash is not None:
            self._hash.update(data)
        return data

    def drain(self) -> None:
        """Read to the end (the tar's padding after its last member), so `bytes` and the hash cover the file."""
        while self.read(CHUNK):
            pass

    def sha256(self) -> str | None:
        return None if self._hash is None else self._hash.hexdigest()


@contextlib.contextmanager
def open_stream(location: str, hashed: bool = False) -> Iterator[Stream]:
    """`location` open as a `Stream`; one-line VmoeError when it cannot be opened or its command fails."""
    kind = scheme(location)
    if kind == "pipe":
        with _pipe(location, hashed) as stream:
            yield stream
        return
    if kind in ("http", "https"):
        raw = _http(location)
    elif kind:
        raw = _fsspec(location, kind)
    else:
        try:
            raw = open(local_path(location), "rb")  # noqa: SIM115 (closed below)
        except OSError as e:
            raise VmoeError(f"{location}: cannot open the shard ({e.strerror})") from None
    with raw:
        yield Stream(raw, hashed)


def _http(url: str) -> Any:
    try:
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise VmoeError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise VmoeError(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None


@contextlib.contextmanager
def _pipe(location: str, hashed: bool) -> Iterator[Stream]:
    """The standard output of `pipe:COMMAND`. A command that exits with an error is reported with the last line
    it wrote to stderr, in place of whatever its short output made the tar reader say; a command still running
    when the reader stops early is killed."""
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(location[5:], shell=True, stdout=subprocess.PIPE, stderr=errors)
        stream = Stream(proc.stdout, hashed)
        try:
            yield stream
        except Exception:
            _raise_if_failed(location, proc, errors, stream)
            raise
        finally:
            if proc.poll() is None and not stream.eof:
                proc.kill()
            proc.stdout.close()
            proc.wait()
        _raise_if_failed(location, proc, errors, stream)


def _raise_if_failed(location: str, proc: subprocess.Popen, errors: Any, stream: Stream) -> None:
    if not stream.eof:
        return  # stopped early (or the tar reader failed mid-stream): the command's status says nothing
    try:
        status = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return
    if status:
        errors.seek(0)
        lines = errors.read().decode(errors="replace").strip().splitlines()
        said = f": {lines[-1]}" if lines else ""
        raise VmoeError(f"{location}: the command exited with status {status}{said}")


def _fsspec_filesystem(location: str, kind: str) -> Any:
    try:
        import fsspec
    except ImportError:
        raise VmoeError(
            f"{location}: reading {kind}:// URLs needs fsspec (pip install fsspec and its {kind} backend)"
        ) from None
    try:
        return fsspec.filesystem(kind)
    except (ImportError, ValueError) as e:  # the backend is missing, or no fsspec protocol has this name
        raise VmoeError(f"{location}: fsspec cannot read {kind}:// URLs ({e})") from None


def _fsspec(location: str, kind: str) -> Any:
    filesystem = _fsspec_filesystem(location, kind)
    try:
        return filesystem.open(location, "rb")
    except FileNotFoundError:
        raise VmoeError(f"{location}: no such shard") from None
    except OSError as e:
        raise VmoeError(f"{location}: cannot open the shard ({e})") from None


def samples(stream: Stream, location: str, label_key: str | None, remedy: str) -> Iterator[dict[str, Any]]:
    """The samples of one tar as `{"key", "image": bytes, "label": int}`, in tar order.

    The label is the `.cls` member, or with `label_key` the integer under that key of the `.json` member. Only
    image, label and (with `label_key`) json members are read; other members are skipped unread. A sample without
    an image or a label is a one-line VmoeError ending with `remedy`, as is a stream that is not a tar.
    """
    wanted = {*IMAGE_EXTS, "json" if label_key else "cls"}

    def select(name: str) -> bool:
        ext = base_plus_ext(name)[1]
        return ext is not None and ext.lower() in wanted

    files = tar_file_expander([{"url": location, "stream": stream}], select_files=select, eof_value=None)
    grouped = group_by_keys(files)
    while True:
        try:
            sample = next(grouped, None)
        except (OSError, EOFError, ValueError, tarfile.TarError) as e:
            raise VmoeError(f"{location}: unreadable tar ({_reason(e)}); {remedy}") from None
        if sample is None:
            return
        where = f"{location}: sample {sample['__key__']}"
        image, label = _image(sample, where, remedy), _label(sample, label_key, where, remedy)
        yield {"key": sample["__key__"], "image": image, "label": label}


def _reason(error: Exception) -> str:
    """The message of a tar error without the stream and URL webdataset appends to it."""
    text = str(error.args[0]) if error.args else type(error).__name__
    return text.split(" @ ")[0]


def _image(sample: dict[str, Any], where: str, remedy: str) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise VmoeError(f"{where} has no image ({', '.join(IMAGE_EXTS)}); {remedy}")


def _label(sample: dict[str, Any], label_key: str | None, where: str, remedy: str) -> int:
    if label_key is None:
        if "cls" not in sample:
            raise VmoeError(f"{where} has no .cls label; {remedy}")
        value, what = sample["cls"].decode(errors="replace").strip(), ".cls label"
    else:
        try:
            meta = json.loads(sample["json"]) if "json" in sample else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        if not isinstance(meta, dict) or label_key not in meta:
            raise VmoeError(f"{where} has no {label_key!r} in a .json member; {remedy}")
        value, what = meta[label_key], f".json {label_key!r}"
    if isinstance(value, str) and value.isdecimal():
        value = int(value)
    if type(value) is not int or value < 0:
        raise VmoeError(f"{where}: {what} {value!r} is not a whole number >= 0; {remedy}")
    return value
