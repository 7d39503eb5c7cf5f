"""Small synthetic datasets in the real layouts, and their shards, shared by the data tests."""

from __future__ import annotations

import shutil

import pytest

from mtlora_dist.data.ingest.convert import convert
from mtlora_dist.synthetic.datasets import generate

from datatest_utils import NYUD, PASCAL, SHARD_MB


@pytest.fixture(scope="session")
def pascal_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("pascal") / "PASCAL_MT")
    generate("pascal_context", root, **PASCAL)
    return root


@pytest.fixture(scope="session")
def nyud_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("nyud") / "NYUD_MT")
    generate("nyud", root, **NYUD)
    return root


@pytest.fixture(scope="session")
def pascal_shards(pascal_root, tmp_path_factory) -> dict[str, str]:
    """Local shard folders ``{"train": dir, "val": dir}`` of the synthetic PASCAL set."""
    out = tmp_path_factory.mktemp("pascal_shards")
    urls = {}
    for split in ("train", "val"):
        urls[split] = str(out / split)
        convert("pascal_context", pascal_root, split, urls[split], shard_size_mb=SHARD_MB)
    return urls


@pytest.fixture(scope="session")
def nyud_shards(nyud_root, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("nyud_shards")
    urls = {}
    for split in ("train", "val"):
        urls[split] = str(out / split)
        convert("nyud", nyud_root, split, urls[split], shard_size_mb=SHARD_MB)
    return urls


@pytest.fixture
def shard_copy(pascal_shards, tmp_path):
    """A private copy of the PASCAL train shards that a test may damage."""

    def make(split: str = "train") -> str:
        dst = str(tmp_path / f"copy-{split}")
        shutil.copytree(pascal_shards[split], dst)
        return dst

    return make
