"""The training order through ``build_loader`` on a dataset stored sorted by scene (a synthetic Cityscapes
tree, converted into shards larger than a worker's share): every batch about as mixed as a uniform
shuffle, the same global batches on any number of ranks and workers, and the drop_last report."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil

import pytest

from mtlora_dist.config import data_config
from mtlora_dist.data.shards.manifest import read_manifest
from mtlora_dist.data.shards.tarshards import iter_tar_samples
from mtlora_dist.synthetic.layouts import make_cityscapes_tree

from datatest_utils import convert_splits
from factories import make_loader

NUM_TRAIN = 96
GROUP = 8  # a "scene": 8 samples next to each other in storage (12 scenes), as cities or buildings are
TASKS = ["semseg", "depth"]


@pytest.fixture(scope="module")
def sorted_shards(tmp_path_factory) -> dict:
    tree = make_cityscapes_tree(tmp_path_factory.mktemp("cityscapes"), {"train": NUM_TRAIN}, (16, 32))
    out = convert_splits(
        "cityscapes", tree.root, tmp_path_factory.mktemp("shards"), fmt=data_config("cityscapes").format,
        splits=("train",), shard_size_mb=0.22,
    )  # fmt: skip
    url = out["urls"]["train"]
    counts = [s.num_samples for s in read_manifest(url).shards]
    assert min(counts[:-1]) > NUM_TRAIN // 4  # shards larger than one worker's share at 2 ranks x 2 workers
    stored = sorted(tree.samples["train"])  # conversion keeps the sorted order of the keys
    return {"url": url, "scene": {key: i // GROUP for i, key in enumerate(stored)}}


def loader(url: str, *, rank: int = 0, world_size: int = 1, num_workers: int = 0, batch_size: int = 8, **kw):
    return make_loader(url, dataset="cityscapes", tasks=TASKS, split="train", img_size=(16, 32),
                        batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size, seed=4,
                        **kw)  # fmt: skip


def rank_batches(url: str, world_size: int, num_workers: int, batch_size: int, **kw) -> list[list[list[str]]]:
    """Per rank, the keys of every batch of epoch 0 (ranks simulated one after the other)."""
    out = []
    for rank in range(world_size):
        ldr = loader(url, rank=rank, world_size=world_size, num_workers=num_workers, batch_size=batch_size, **kw)
        out.append([list(b["__key__"]) for b in ldr])
        ldr.close()
    return out


def uniform_scenes(batch: int) -> float:
    """Expected distinct scenes in ``batch`` samples drawn uniformly without replacement."""
    n, scenes = NUM_TRAIN, NUM_TRAIN // GROUP
    return scenes * (1 - math.comb(n - GROUP, batch) / math.comb(n, batch))


@pytest.mark.parametrize("world_size,num_workers,batch_size", [(1, 0, 8), (2, 2, 8), (4, 1, 4)])
def test_batches_are_as_mixed_as_a_uniform_shuffle(sorted_shards, world_size, num_workers, batch_size):
    scene = sorted_shards["scene"]
    batches = [
        b for per_rank in rank_batches(sorted_shards["url"], world_size, num_workers, batch_size) for b in per_rank
    ]
    assert len(batches) == world_size * (NUM_TRAIN // (world_size * batch_size))
    mean = sum(len({scene[k] for k in b}) for b in batches) / len(batches)
    assert mean >= 0.9 * uniform_scenes(batch_size), (mean, uniform_scenes(batch_size))


def global_batches(url: str, world_size: int, num_workers: int, accumulation: int) -> list[list[str]]:
    """The epoch's global batches of 16: step s is rank 0's micro-batches s*A..s*A+A-1, then rank 1's..."""
    micro = 16 // (world_size * accumulation)
    per_rank = rank_batches(url, world_size, num_workers, micro, accumulation=accumulation)
    steps = len(per_rank[0]) // accumulation
    return [
        [k for r in range(world_size) for a in range(accumulation) for k in per_rank[r][s * accumulation + a]]
        for s in range(steps)
    ]


def test_a_global_batch_of_16_is_the_same_on_1_2_and_4_ranks_and_any_workers(sorted_shards):
    url = sorted_shards["url"]
    reference = global_batches(url, 1, 0, 1)
    assert len(reference) == NUM_TRAIN // 16 and len({k for b in reference for k in b}) == NUM_TRAIN
    for world_size, num_workers, accumulation in [(1, 2, 2), (2, 0, 1), (2, 1, 2), (4, 2, 1), (4, 1, 1)]:
        got = global_batches(url, world_size, num_workers, accumulation)
        assert got == reference, (world_size, num_workers, accumulation)


def test_drop_last_reports_unused_samples_and_warns_above_five_percent(sorted_shards, caplog):
    url = sorted_shards["url"]
    with caplog.at_level(logging.INFO, logger="mtlora_dist"):
        small = loader(url, batch_size=4, world_size=2)  # global batch 8: 96 samples, none left out
    assert small.unused_per_epoch == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "12 global batches of 8 per epoch, 0 of 96 samples (0.0%) unused" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtlora_dist"):
        big = loader(url, batch_size=10, world_size=2, accumulation=2)  # global batch 40: 2 batches, 16 unused
    assert big.unused_per_epoch == 16 and len(big) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "16 of 96 samples (16.7%) unused" in warnings[0]
    assert "lower the global batch" in warnings[0]
    keys = [k for b in big for k in b["__key__"]]  # an epoch of rank 0: its 4 micro-batches of 10
    assert len(keys) == 40 == len(set(keys))


def test_a_missing_shard_is_skipped_on_every_rank_without_desynchronising(sorted_shards, tmp_path):
    """``on_error=skip``: the lost samples are counted and stood in for on whichever rank needed them;
    every rank still yields its ``len(loader)`` batches, and the global batches keep their order."""
    url = str(tmp_path / "shards")
    shutil.copytree(sorted_shards["url"], url)
    manifest = read_manifest(url)
    lost = manifest.shards[1]
    (tmp_path / "shards" / lost.name).unlink()
    whole = rank_batches(sorted_shards["url"], 2, 2, 8)
    missing, padded = 0, 0
    for rank in range(2):
        ldr = loader(url, rank=rank, world_size=2, num_workers=2, batch_size=8, on_error="skip")
        batches = list(ldr)
        assert len(batches) == len(ldr) == len(whole[rank])
        for got, want in zip(batches, whole[rank], strict=True):
            ok = [k for k, v in zip(got["__key__"], got["valid"].tolist(), strict=True) if v]
            assert set(ok) <= set(want) and len(got["__key__"]) == len(want)
        missing += ldr.stats["samples_missing"]
        padded += ldr.stats["samples_padded"]
        ldr.close()
    used = {k for per_rank in whole for b in per_rank for k in b}
    in_lost = sum(1 for i in range(lost.num_samples) if _key_of(sorted_shards["url"], 1, i) in used)
    assert missing == padded == in_lost > 0


def _key_of(url: str, shard: int, index: int) -> str:
    name = read_manifest(url).shards[shard].name
    with open(f"{url}/{name}", "rb") as f:
        return [key for key, _ in iter_tar_samples(f)][index]


def _unindexed_copy(url: str, dst: str) -> str:
    """The shards with a manifest from before the per-sample index: every worker reads whole shards."""
    shutil.copytree(url, dst)
    manifest = read_manifest(dst)
    manifest.shards = [dataclasses.replace(s, offsets=[], digests="") for s in manifest.shards]
    with open(f"{dst}/manifest.json", "w") as f:
        f.write(manifest.to_json())
    return dst


@pytest.mark.parametrize("world_size,num_workers,batch_size", [(2, 2, 8), (4, 1, 4)])
def test_an_epoch_reads_each_used_sample_once_not_whole_shards(sorted_shards, tmp_path, world_size, num_workers,
                                                               batch_size):  # fmt: skip
    """Bytes read per epoch (all ranks): exactly the used samples' bytes with the index, though every
    shard is shared by several workers; whole shards, several times over, without it."""
    url = sorted_shards["url"]
    shards = read_manifest(url).shards
    samples_bytes = sum(s.offsets[-1] - s.offsets[0] for s in shards)
    dataset_bytes = sum(s.bytes for s in shards)

    def epoch_bytes(folder: str) -> tuple[int, int]:
        total, opened = 0, 0
        for rank in range(world_size):
            ldr = loader(folder, rank=rank, world_size=world_size, num_workers=num_workers, batch_size=batch_size)
            assert len(list(ldr)) == len(ldr)
            total, opened = total + ldr.stats["bytes_read"], opened + ldr.stats["shards_opened"]
            ldr.close()
        return total, opened

    ranged, opens = epoch_bytes(url)
    assert NUM_TRAIN % (world_size * batch_size) == 0  # every sample used
    assert ranged == samples_bytes < dataset_bytes
    assert opens > len(shards)  # shards are shared by workers: each reads only its samples' ranges
    whole, _ = epoch_bytes(_unindexed_copy(url, str(tmp_path / "unindexed")))
    assert whole > dataset_bytes and whole % 512 == 0  # whole tars, some read by several workers
