"""WebDataset tars wherever they are: shard locations, brace patterns, one forward byte stream per location, and
the samples of that stream as the loader and `vmoe shard-index` both read them.

A location is a local path (or `file://`), an `http(s)://` URL (read with urllib; failures that may pass are
tried again, see `_Http`), a `pipe:COMMAND` whose standard output is the tar (the command runs in a shell, as in
webdataset), or any other `scheme://` URL read through fsspec when it and the scheme's backend (s3fs for
`s3://`, gcsfs for `gs://`) are installed. Nothing
is read whole into memory: tarfile's stream mode reads one member after another. Samples are grouped by
webdataset's own functions, so the samples an index counts are those the loader and stock webdataset read.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand

from vmoe_cli.errors import VmoeError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
HTTP_TIMEOUT_S = 60.0  # a stalled server is a failed try after this long, not a hang
HTTP_TRIES = 6  # tries in a row without a byte read before an HTTP failure is an error
HTTP_WAIT_S = 1.0  # the wait after the first failed try, doubled after each next one (31 s over 6 tries)
HTTP_PASSING = (408, 425, 429, 500, 502, 503, 504)  # statuses tried again: the server may answer next time
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
        raw = _Http(location)
    elif kind:
        raw = _fsspec(location, kind)
    else:
        try:
            raw = open(local_path(location), "rb")  # noqa: SIM115 (closed below)
        except OSError as e:
            raise VmoeError(f"{location}: cannot open the shard ({e.strerror})") from None
    with raw:
        yield Stream(raw, hashed)


class _Http:
    """The body of an HTTP(S) URL, read forward. A failed connection, a timeout, a connection cut mid-body or a
    passing server error (HTTP 408, 429, 5xx) is tried again up to `HTTP_TRIES` times in a row, waiting
    `HTTP_WAIT_S` and then twice as long each time; a body cut short resumes where it stopped with a Range
    request. A shard read for hours thus survives a server or network hiccup, and fails with one line when the
    failure lasts."""

    def __init__(self, url: str):
        self.url = url
        self.offset = 0  # bytes of the body read so far
        self.failures = 0  # in a row, since the last byte read
        self.response: Any = None
        self.read(0)  # connect now, with the same tries as every read

    def read(self, size: int = CHUNK) -> bytes:
        while True:
            try:
                if self.response is None:
                    self.response = self._open()
                data = self.response.read(size)
                if not data and size and self.response.length:  # urllib's read returns b"" on a cut body
                    raise http.client.IncompleteRead(b"", self.response.length)
            except (OSError, http.client.HTTPException) as e:
                self._wait_after(e)
                continue
            self.failures = 0
            self.offset += len(data)
            return data

    def close(self) -> None:
        if self.response is not None:
            self.response.close()

    def __enter__(self) -> _Http:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> Any:
        """A response for the body from `offset` on; OSError for what may pass, VmoeError for what will not."""
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if e.code in HTTP_PASSING:
                raise ConnectionError(f"HTTP {e.code} {e.reason}") from None
            raise VmoeError(f"{self.url}: HTTP {e.code} {e.reason}") from None
        if self.offset and response.status != 206:
            response.close()
            raise VmoeError(
                f"{self.url}: the connection broke after {self.offset:,} bytes and the server cannot resume it "
                "(it ignores Range requests); read the shard again, or copy it nearer"
            )
        return response

    def _wait_after(self, error: Exception) -> None:
        """Close the broken response and wait before the next try, or fail with one line after the last."""
        self.close()
        self.response = None
        self.failures += 1
        if self.failures >= HTTP_TRIES:
            reason = getattr(error, "reason", None) or str(error) or type(error).__name__
            where = f"connection lost after {self.offset:,} bytes" if self.offset else "cannot connect"
            raise VmoeError(f"{self.url}: {where} ({reason}), {HTTP_TRIES} tries") from None
        time.sleep(HTTP_WAIT_S * 2 ** (self.failures - 1))


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
    from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander  # imports torch: only here

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
