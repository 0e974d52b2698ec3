"""Benchmark `vmoe shard-index`'s scan of one shard against stock webdataset reading the same tars.

Both run in this one process, one after the other, on the same files (read once before, so both find them in
the page cache): the baseline iterates `webdataset.WebDataset(urls)` samples without decoding them; the scan is
`vmoe_cli.data.index.scan_shard` per shard, without and with sha256. Reported: images per CPU-second (process
time of this one process) and the ratio to the baseline.

Usage:  python scripts/bench_index.py 'shards/fmnist/train-{000000..000011}.tar'
"""

from __future__ import annotations

import argparse
import time

import webdataset as wds

from vmoe_cli.data.index import scan_shard
from vmoe_cli.data.tars import expand


def per_cpu_second(run) -> tuple[int, float]:
    """(images, images per CPU-second) of `run()`, which returns the images it read."""
    start = time.process_time()
    images = run()
    return images, images / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="+", help="Local tars: paths or brace patterns.")
    urls = [url for pattern in parser.parse_args().shards for url in expand(pattern)]
    for url in urls:  # into the page cache
        with open(url, "rb") as f:
            while f.read(1 << 20):
                pass
    images, base = per_cpu_second(lambda: sum(1 for _ in wds.WebDataset(urls, shardshuffle=False)))
    print(f"{len(urls)} shards, {images:,} images")
    print(f"stock webdataset, samples undecoded: {base:,.0f} images per CPU-second")
    for sha256 in (False, True):
        _, rate = per_cpu_second(lambda sha256=sha256: sum(scan_shard(u, None, sha256)["count"] for u in urls))
        print(f"vmoe shard-index scan{' + sha256' if sha256 else ''}: {rate:,.0f} images per CPU-second "
              f"({rate / base:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
