"""A worker's memory is bounded by ``data.read.buffer_mb``, not by the dataset: measured through real loaders.

The reader counts the bytes it holds ahead of delivery (fetched or in flight, not yet handed to the
decoder) and reports its peak in ``loader.stats["read_held_peak"]`` (summed over a rank's workers).
"""

from __future__ import annotations

import pytest

from mtlora_dist.data.config import BatchGeometry
from mtlora_dist.data.shards.manifest import read_manifest
from mtlora_dist.data.stream.plan import locate, make_worker_plan, shard_order

from datatest_utils import PASCAL, drop_index, keys_of, pascal_loader, valid_keys

BOUND_MB = 0.1  # ~2 of the test set's ~45 kB samples


def share_bytes(url: str, num_workers: int, worker: int, batch_size: int, seed: int) -> int:
    """Bytes of the samples one worker delivers in epoch 0 (what reading in storage order would hold)."""
    manifest = read_manifest(url)
    counts = [s.num_samples for s in manifest.shards]
    plan = make_worker_plan(
        manifest.num_samples, BatchGeometry(batch_size), rank=0, num_workers=num_workers, worker=worker, seed=seed,
        epoch=0, shuffle=True, drop_last=True,
    )  # fmt: skip
    slots = locate(plan.positions, counts, shard_order(len(counts), seed, 0, True))
    return sum(manifest.shards[s].offsets[i + 1] - manifest.shards[s].offsets[i] for s, i in slots)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_peak_held_per_worker_stays_under_the_bound_where_reading_whole_shards_exceeds_it(shard_copy, num_workers):
    url = shard_copy()
    bound = int(BOUND_MB * 2**20)
    workers = max(1, num_workers)
    assert min(share_bytes(url, workers, w, 2, 0) for w in range(workers)) > 3 * bound  # the dataset is larger

    loader = pascal_loader(url, num_workers=num_workers, buffer_mb=BOUND_MB, seed=0)
    batches = list(loader)
    stats = loader.stats
    assert len(valid_keys(batches)) == len(set(keys_of(batches))) == PASCAL["num_train"]
    assert 0 < stats["read_held_peak"] <= workers * bound  # each worker's peak <= the bound
    assert stats["read_requests"] <= 1.1 * PASCAL["num_train"]
    used = sum(s.offsets[-1] - s.offsets[0] for s in read_manifest(url).shards)
    assert stats["bytes_read"] == used

    whole = pascal_loader(drop_index(url), num_workers=num_workers, buffer_mb=BOUND_MB, seed=0)
    assert sorted(keys_of(list(whole))) == sorted(keys_of(batches))
    assert whole.stats["read_held_peak"] > workers * bound  # whole shards: samples held until their turn


def test_a_larger_buffer_holds_more_and_sends_fewer_requests(shard_copy):
    url = shard_copy()
    small = pascal_loader(url, buffer_mb=BOUND_MB, shuffle=False, seed=0)
    large = pascal_loader(url, buffer_mb=4, shuffle=False, seed=0)
    assert keys_of(list(small)) == keys_of(list(large))
    assert small.stats["read_held_peak"] <= int(BOUND_MB * 2**20) < large.stats["read_held_peak"]
    assert large.stats["read_requests"] < small.stats["read_requests"]


def test_a_bad_buffer_is_one_clear_error(pascal_shards):
    with pytest.raises(ValueError, match=r"data.read.buffer_mb is 0; pass more than 0"):
        pascal_loader(pascal_shards["train"], buffer_mb=0)
    with pytest.raises(ValueError, match=r"data.read.concurrency is 0; pass 1 or more"):
        pascal_loader(pascal_shards["train"], concurrency=0)
