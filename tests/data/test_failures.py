"""Damaged data is counted and replaced (``on_error="skip"``) or a clear error (``"raise"``), never silent.

Every case runs through a real DataLoader worker: a crash in a decoder would surface as a dead worker.
"""

from __future__ import annotations

import json
import os
import tarfile

import pytest

from mtlora_dist.data.errors import DataError, TooManyFailuresError
from mtlora_dist.data.manifest import read_manifest
from mtlora_dist.data.tarshards import TarShardWriter, iter_tar_samples

from datatest_utils import PASCAL, keys_of, pascal_loader, valid_keys


def shard_with_samples(folder: str, at_least: int = 2) -> tuple[str, int, list[str]]:
    manifest = read_manifest(folder)
    for shard in manifest.shards:
        if shard.num_samples >= at_least:
            path = os.path.join(folder, shard.name)
            with open(path, "rb") as f:
                keys = [k for k, _ in iter_tar_samples(f)]
            return path, shard.num_samples, keys
    raise AssertionError("no shard with enough samples")


def run_epoch(folder: str, on_error: str = "skip"):
    loader = pascal_loader(folder, num_workers=1, batch_size=2, on_error=on_error)
    batches = list(loader)
    assert len(batches) == len(loader) == PASCAL["num_train"] // 2  # the batch count never changes
    return batches, loader.stats


def rewrite(path: str, edit) -> None:
    """Rebuild a shard sample by sample, letting ``edit(index, key, members)`` change members."""
    with open(path, "rb") as f:
        samples = list(iter_tar_samples(f))
    with TarShardWriter(path) as w:
        for i, (key, members) in enumerate(samples):
            w.add(key, sorted(edit(i, key, dict(members)).items(), key=lambda kv: kv[0] != "jpg"))


def check_skipped(batches, stats, lost_keys: list[str], missing: int, skipped: int, failed_shards: int) -> None:
    assert stats["samples_missing"] == missing and stats["samples_skipped"] == skipped
    assert stats["shards_failed"] == failed_shards
    assert stats["samples_padded"] == missing + skipped  # every lost sample replaced by a marked copy
    good = valid_keys(batches)
    assert len(good) == PASCAL["num_train"] - missing - skipped == len(set(good))
    assert not set(good) & set(lost_keys)
    assert len(keys_of(batches)) == PASCAL["num_train"]


def test_garbage_shard(shard_copy):
    folder = shard_copy()
    path, n, keys = shard_with_samples(folder)
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    check_skipped(*run_epoch(folder), keys, missing=n, skipped=0, failed_shards=1)
    with pytest.raises(DataError, match=os.path.basename(path)):
        run_epoch(folder, "raise")


def test_tar_cut_at_a_header_is_caught_by_the_count(shard_copy):
    folder = shard_copy()
    path, n, keys = shard_with_samples(folder)
    with tarfile.open(path) as tar:
        second = next(m for m in tar.getmembers() if m.name.startswith(keys[1] + "."))
    with open(path, "r+b") as f:
        f.truncate(second.offset)  # what tarfile reads as a clean end of the archive
    with open(path, "rb") as f:
        assert [k for k, _ in iter_tar_samples(f)] == keys[:1]  # silently short without the manifest
    check_skipped(*run_epoch(folder), keys[1:], missing=n - 1, skipped=0, failed_shards=1)
    with pytest.raises(DataError, match=rf"{os.path.basename(path)} is truncated: the tar ended after 1 sample"):
        run_epoch(folder, "raise")


def test_tar_cut_inside_a_member(shard_copy):
    folder = shard_copy()
    path, n, keys = shard_with_samples(folder)
    with tarfile.open(path) as tar:
        normals = next(m for m in tar.getmembers() if m.name == f"{keys[1]}.normals.npy")
    with open(path, "r+b") as f:
        f.truncate(normals.offset_data + normals.size // 2)
    check_skipped(*run_epoch(folder), keys[1:], missing=n - 1, skipped=0, failed_shards=1)
    with pytest.raises(DataError, match=os.path.basename(path)):
        run_epoch(folder, "raise")


def test_corrupt_png_inside_a_shard(shard_copy):
    folder = shard_copy()
    path, _, keys = shard_with_samples(folder)

    def corrupt(i, key, members):
        if i == 1:
            png = bytearray(members["sal.png"])
            at = png.index(b"IDAT") + 8
            png[at] ^= 0xFF
            members["sal.png"] = bytes(png)
        return members

    rewrite(path, corrupt)
    check_skipped(*run_epoch(folder), [keys[1]], missing=0, skipped=1, failed_shards=0)
    with pytest.raises(DataError, match=rf"bad sample in shard .*{os.path.basename(path)}.*'{keys[1]}'.*bad CRC"):
        run_epoch(folder, "raise")


def test_sample_missing_a_task_member(shard_copy):
    folder = shard_copy()
    path, _, keys = shard_with_samples(folder)
    rewrite(path, lambda i, key, m: {k: v for k, v in m.items() if not (i == 0 and k == "normals.npy")})
    check_skipped(*run_epoch(folder), [keys[0]], missing=0, skipped=1, failed_shards=0)
    with pytest.raises(DataError, match=rf"{keys[0]}' lacks member\(s\) \['normals.npy'\]"):
        run_epoch(folder, "raise")


def test_missing_shard_file(shard_copy):
    folder = shard_copy()
    path, n, keys = shard_with_samples(folder)
    os.remove(path)
    check_skipped(*run_epoch(folder), keys, missing=n, skipped=0, failed_shards=1)
    with pytest.raises(DataError, match="listed in the manifest does not exist"):
        run_epoch(folder, "raise")


def test_stale_manifest_with_fewer_samples_than_the_shard(shard_copy):
    folder = shard_copy()
    path, n, _ = shard_with_samples(folder)
    manifest_path = os.path.join(folder, "manifest.json")
    manifest = json.load(open(manifest_path))
    entry = next(s for s in manifest["shards"] if s["name"] == os.path.basename(path))
    entry["num_samples"] -= 1
    manifest["num_samples"] -= 1
    json.dump(manifest, open(manifest_path, "w"))
    loader = pascal_loader(folder, num_workers=1, batch_size=1, on_error="raise", shuffle=False)
    with pytest.raises(DataError, match="holds more than the .* samples its manifest lists"):
        list(loader)


def test_nothing_readable_is_an_error_even_when_skipping(shard_copy):
    folder = shard_copy()
    for shard in read_manifest(folder).shards:
        with open(os.path.join(folder, shard.name), "wb") as f:
            f.write(b"\0garbage" * 100)
    with pytest.raises(TooManyFailuresError, match="no sample of this worker's share"):
        run_epoch(folder)
