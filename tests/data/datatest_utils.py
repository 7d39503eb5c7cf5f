"""Helpers for the data tests: run loaders and compare what they yield."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import torch

from mtlora_dist.data.ingest.convert import convert
from mtlora_dist.storage.fs import StorageOptions, url_to_fs

from factories import make_loader

PASCAL = {"num_train": 24, "num_val": 10, "seed": 3, "size": 80}  # the session datasets (conftest.py)
NYUD = {"num_train": 12, "num_val": 6, "seed": 4, "size": 72}
SHARD_MB = 0.12  # ~2 samples per shard at these sizes: several shards per rank and worker
PASCAL_TASKS = ["semseg", "human_parts", "sal", "normals", "edge"]
NYUD_TASKS = ["semseg", "depth", "normals", "edge"]


def pascal_loader(url: str, split: str = "train", **kw: Any):
    """A loader over PASCAL-Context shards; keywords as :func:`factories.make_loader`."""
    args = {"dataset": "pascal_context", "tasks": PASCAL_TASKS, "img_size": (48, 64), "batch_size": 2, **kw}
    return make_loader(url, split, **args)


def epoch_batches(loader) -> list[dict[str, Any]]:
    return list(loader)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def valid_keys(batches) -> list[str]:
    return [k for b in batches for k, v in zip(b["__key__"], b["valid"].tolist(), strict=True) if v]


def assert_batches_equal(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def multiplicity(keys) -> Counter:
    return Counter(keys)


def upload(folder: str, url: str, storage: StorageOptions | None = None) -> str:
    """Copy a local shard folder to ``url`` (an S3 prefix); returns ``url``."""
    fs, path = url_to_fs(url, storage)
    for name in sorted(os.listdir(folder)):
        fs.put_file(os.path.join(folder, name), f"{path}/{name}")
    return url


def state_after(loader, batches: int) -> dict:
    """The loader's state after ``batches`` batches of its current epoch; its workers are stopped."""
    it = iter(loader)
    for _ in range(batches):
        next(it)
    state = loader.state_dict()
    del it
    loader.close()
    return state


def convert_splits(dataset: str, root: str, out: str, fmt=None, splits=("train", "val"), shard_size_mb=0.05) -> dict:
    """Each split of a dataset converted into ``<out>/<split>``: ``{"urls": {split: folder}, "manifests": {...}}``."""
    urls = {s: os.path.join(str(out), s) for s in splits}
    manifests = {s: convert(dataset, str(root), s, urls[s], shard_size_mb=shard_size_mb, fmt=fmt) for s in splits}
    return {"urls": urls, "manifests": manifests}


def drop_index(folder: str) -> str:
    """Turn the folder's manifest into one written before the per-sample index existed."""
    manifest_path = os.path.join(folder, "manifest.json")
    manifest = json.load(open(manifest_path))
    for entry in manifest["shards"]:
        del entry["offsets"], entry["digests"]
    json.dump(manifest, open(manifest_path, "w"))
    return folder
