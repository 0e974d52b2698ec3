"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmoe_cli.data.shard import ShardOptions, write_shards
from vmoe_cli.data.sources import open_source


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The digits, sharded once: 6 train shards of <= 300 samples, 180 minival samples."""
    out = tmp_path_factory.mktemp("digits")
    write_shards(open_source("digits"), out, ShardOptions(shard_size=300, minival=0.1), workers=1)
    return out
