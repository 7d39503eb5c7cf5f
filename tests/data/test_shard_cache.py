"""The node-local shard cache (``storage/shard_cache.py``) and the loader reading through it from S3:
later epochs come from local disk, verified, in exactly the same order."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from mtlora_dist.data.shards.manifest import read_manifest
from mtlora_dist.storage.shard_cache import ShardCache

from datatest_utils import PASCAL, assert_batches_equal, keys_of, pascal_loader, state_after, upload


def _store(cache: ShardCache, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    entry = cache.new_entry(sha)
    entry.write(data)
    entry.commit()
    return sha


def test_cache_evicts_the_oldest_entries_over_its_cap(tmp_path):
    cache = ShardCache(str(tmp_path / "c"), max_bytes=2500)
    first = _store(cache, b"a" * 1000)
    time.sleep(0.02)
    second = _store(cache, b"b" * 1000)
    time.sleep(0.02)
    with cache.open(first) as f:  # a hit makes the entry recent
        assert f.read() == b"a" * 1000
    time.sleep(0.02)
    third = _store(cache, b"c" * 1000)  # 3000 bytes > cap: the least recently used goes
    assert cache.open(second) is None
    assert cache.open(first) is not None and cache.open(third) is not None
    assert sum(size for _, size, _ in cache.entries()) <= 2500
    assert not [n for n in os.listdir(cache.folder) if n.endswith(".part")]  # no temporary file left


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    cache = ShardCache(str(tmp_path / "c"), max_bytes=10_000)
    stale, fresh = os.path.join(cache.folder, ".dead-1.part"), os.path.join(cache.folder, ".busy-2.part")
    for path in (stale, fresh):
        open(path, "wb").write(b"x")
    os.utime(stale, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    _store(cache, b"d" * 10)
    assert not os.path.exists(stale) and os.path.exists(fresh)  # another process may still be writing it


def test_aborted_entry_leaves_nothing(tmp_path):
    cache = ShardCache(str(tmp_path / "c"), max_bytes=10_000)
    entry = cache.new_entry("0" * 64)
    entry.write(b"partial")
    entry.abort()
    assert os.listdir(cache.folder) == [] and cache.open("0" * 64) is None
    with pytest.raises(ValueError, match="sha256"):
        cache.path("../etc/passwd")
    with pytest.raises(ValueError, match="positive size cap"):
        ShardCache(str(tmp_path / "d"), max_bytes=0)


@pytest.mark.integration
def test_second_epoch_reads_the_cache_with_the_same_batches(pascal_shards, s3_bucket, tmp_path):
    url = upload(pascal_shards["train"], f"s3://{s3_bucket}/pascal/train")
    manifest = read_manifest(url)
    cache_dir = str(tmp_path / "cache")
    kw = {"num_workers": 2, "batch_size": 2, "seed": 3}
    cached = pascal_loader(url, cache_dir=cache_dir, **kw)
    plain = pascal_loader(url, **kw)
    first = list(cached)
    opened, hits = cached.stats["shards_opened"], cached.stats["shards_from_cache"]
    # epoch 1 reads every shard from the bucket; a shard that both workers need may come from the other's
    # copy (the training order spreads each worker over the epoch, so the cache saves bucket reads)
    assert opened >= len(manifest.shards)
    stored = sorted(n for n in os.listdir(cache_dir) if n.endswith(".tar"))
    assert stored == sorted(f"{s.sha256}.tar" for s in manifest.shards)  # every shard, named by content
    for shard in manifest.shards:
        with open(os.path.join(cache_dir, f"{shard.sha256}.tar"), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == shard.sha256
    second = list(cached)
    assert cached.stats["shards_opened"] == opened  # epoch 2 did not touch the bucket
    assert cached.stats["shards_from_cache"] - hits >= len(manifest.shards)
    assert_batches_equal(first, list(plain))  # same order and content as without the cache
    assert_batches_equal(second, list(plain))
    assert sorted(keys_of(second)) == sorted(set(keys_of(second))) and len(keys_of(second)) == PASCAL["num_train"]


@pytest.mark.integration
def test_corrupt_cache_entry_is_dropped_and_read_from_the_store(pascal_shards, s3_bucket, tmp_path, caplog):
    url = upload(pascal_shards["train"], f"s3://{s3_bucket}/pascal/train")
    cache_dir = str(tmp_path / "cache")
    plain = pascal_loader(url, num_workers=0, batch_size=2, seed=1, shuffle=False)
    reference = [list(plain), list(plain)]  # epochs 0 and 1
    loader = pascal_loader(url, num_workers=0, batch_size=2, seed=1, shuffle=False, cache_dir=cache_dir)
    assert_batches_equal(list(loader), reference[0])
    victim = os.path.join(cache_dir, f"{read_manifest(url).shards[1].sha256}.tar")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    opened = loader.stats["shards_opened"]
    assert_batches_equal(list(loader), reference[1])  # nothing lost, nothing different
    assert loader.stats["shards_opened"] == opened + 1 and loader.stats["shards_failed"] == 0
    assert "cached copy" in caplog.text and "corrupt" in caplog.text
    assert hashlib.sha256(open(victim, "rb").read()).hexdigest() == read_manifest(url).shards[1].sha256  # restored


@pytest.mark.integration
def test_cache_stays_under_its_cap_and_resume_is_exact(pascal_shards, s3_bucket, tmp_path):
    url = upload(pascal_shards["train"], f"s3://{s3_bucket}/pascal/train")
    manifest = read_manifest(url)
    cap_gb = 3.5 * max(s.bytes for s in manifest.shards) / 2**30
    kw = {"num_workers": 2, "batch_size": 2, "seed": 8, "cache_dir": str(tmp_path / "cache"), "cache_max_gb": cap_gb}
    reference = pascal_loader(url, num_workers=2, batch_size=2, seed=8)
    reference.set_epoch(1)
    expected = list(reference)
    loader = pascal_loader(url, **kw)
    list(loader)
    assert 0 < sum(size for _, size, _ in ShardCache(kw["cache_dir"], 1).entries()) <= cap_gb * 2**30
    state = state_after(loader, 4)
    resumed = pascal_loader(url, **kw)
    resumed.load_state_dict(state)
    assert_batches_equal(list(resumed), expected[4:])
