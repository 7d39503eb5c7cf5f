"""The per-sample byte index: what the converter writes, what ``launch/convert.py --index`` adds to an
older conversion (locally and in a bucket), and the warning a loader gives without it."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile

import pytest

from mtlora_dist.data.errors import ShardError
from mtlora_dist.data.ingest.convert import main as convert_main
from mtlora_dist.data.shards.manifest import read_manifest
from mtlora_dist.data.shards.shard_index import sample_digest
from mtlora_dist.data.shards.tarshards import iter_tar_samples

from datatest_utils import pascal_loader, upload


def strip_index(folder: str) -> dict:
    """Remove the index from the folder's manifest (as written before it existed); returns the original."""
    path = os.path.join(folder, "manifest.json")
    original = json.load(open(path))
    stripped = json.loads(json.dumps(original))
    for entry in stripped["shards"]:
        del entry["offsets"], entry["digests"]
    json.dump(stripped, open(path, "w"))
    return original


def test_each_sample_is_its_byte_range_and_digest(pascal_shards):
    folder = pascal_shards["train"]
    for shard in read_manifest(folder).shards:
        path = os.path.join(folder, shard.name)
        data = open(path, "rb").read()
        with open(path, "rb") as f:
            keys = [k for k, _ in iter_tar_samples(f)]
        with tarfile.open(path) as tar:
            firsts = [next(m.offset for m in tar.getmembers() if m.name.startswith(k + ".")) for k in keys]
        assert shard.offsets[:-1] == firsts and len(keys) == shard.num_samples
        assert shard.offsets[-1] <= shard.bytes - 1024  # the end-of-archive blocks are no sample's
        for i, key in enumerate(keys):
            piece = data[shard.offsets[i] : shard.offsets[i + 1]]
            assert [k for k, _ in iter_tar_samples(io.BytesIO(piece))] == [key]
            assert shard.sample_digest(i) == sample_digest(piece)


def test_index_command_restores_the_converters_index(shard_copy, capsys):
    folder = shard_copy()
    original = strip_index(folder)
    assert not read_manifest(folder).indexed
    convert_main(["--index", "--out", folder])
    assert json.load(open(os.path.join(folder, "manifest.json"))) == original
    assert "indexed" in capsys.readouterr().out
    before = os.stat(os.path.join(folder, "manifest.json")).st_mtime_ns
    convert_main(["--index", "--out", folder])  # nothing left to index: not rewritten
    assert os.stat(os.path.join(folder, "manifest.json")).st_mtime_ns == before


def test_index_command_refuses_a_shard_that_differs_from_the_manifest(shard_copy):
    folder = shard_copy()
    strip_index(folder)
    shard = read_manifest(folder).shards[2]
    with open(os.path.join(folder, shard.name), "r+b") as f:
        f.seek(700)
        f.write(b"\xff")
    manifest_before = open(os.path.join(folder, "manifest.json")).read()
    with pytest.raises(ShardError, match=rf"{shard.name} does not match its manifest .* nothing was indexed"):
        convert_main(["--index", "--out", folder])
    assert open(os.path.join(folder, "manifest.json")).read() == manifest_before


def test_a_loader_without_the_index_warns_once_with_the_fix(shard_copy, caplog):
    folder = shard_copy()
    strip_index(folder)
    with caplog.at_level(logging.WARNING, logger="mtlora_dist"):
        pascal_loader(folder)
        pascal_loader(folder, split="val")
    warnings = [r.getMessage() for r in caplog.records if "per-sample index" in r.getMessage()]
    assert len(warnings) == 1 and f"launch/convert.py --index --out {folder}" in warnings[0]


@pytest.mark.integration
def test_index_command_on_a_bucket(pascal_shards, s3_bucket, tmp_path):
    folder = str(tmp_path / "old")
    shutil.copytree(pascal_shards["train"], folder)
    original = strip_index(folder)
    url = upload(folder, f"s3://{s3_bucket}/old/train")
    assert not read_manifest(url).indexed
    convert_main(["--index", "--out", url])
    indexed = read_manifest(url)
    assert indexed.indexed and [s.offsets for s in indexed.shards] == [s["offsets"] for s in original["shards"]]
    loader = pascal_loader(url, num_workers=1)
    assert len(list(loader)) == len(loader) and loader.stats["bytes_read"] == sum(
        s.offsets[-1] - s.offsets[0] for s in indexed.shards
    )
