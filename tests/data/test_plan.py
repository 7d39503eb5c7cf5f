"""Epoch planning: coverage, equal batch counts, determinism, an order independent of the rank, worker and
micro-batch split (elastic), resume arithmetic."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mtlora_dist.data.config import BatchGeometry
from mtlora_dist.data.stream.plan import (
    batches_per_rank,
    buffer_shuffle,
    epoch_order,
    locate,
    make_worker_plan,
    shard_order,
)

LAYOUTS = [(37, 2, 2, 4), (40, 3, 4, 5), (24, 2, 1, 3), (100, 4, 3, 7)]
EVAL_LAYOUTS = LAYOUTS + [(5, 4, 3, 2), (3, 4, 2, 2)]  # also: fewer samples than ranks


def plans(n, world, workers, batch, *, train, epoch=0, consumed=0, buffer=8, accumulation=1, switches=()):
    return {
        (r, k): make_worker_plan(
            n,
            BatchGeometry(batch, accumulation, world),
            rank=r,
            num_workers=workers,
            worker=k,
            seed=1,
            epoch=epoch,
            shuffle=train,
            drop_last=train,
            shuffle_buffer=buffer,
            batches_consumed=consumed,
            switches=switches,
        )
        for r in range(world)
        for k in range(workers)
    }


@pytest.mark.parametrize("n,world,workers,batch", LAYOUTS)
def test_training_epoch_sees_each_sample_at_most_once_and_ranks_match(n, world, workers, batch):
    p = plans(n, world, workers, batch, train=True)
    seen = Counter(pos for plan in p.values() for pos in plan.positions)
    assert max(seen.values()) == 1 and all(0 <= x < n for x in seen)
    assert n - len(seen) < world * batch  # dropped: less than one global batch
    assert n - len(seen) == n % (world * batch)
    per_rank = [sum(len(p[r, k].batch_sizes) for k in range(workers)) for r in range(world)]
    assert per_rank == [batches_per_rank(n, BatchGeometry(batch, 1, world), True)] * world
    assert all(size == batch for plan in p.values() for size in plan.batch_sizes)


@pytest.mark.parametrize("n,world,workers,batch", EVAL_LAYOUTS)
def test_evaluation_covers_every_sample_exactly_once(n, world, workers, batch):
    p = plans(n, world, workers, batch, train=False)
    valid = Counter(pos for plan in p.values() for pos, v in zip(plan.positions, plan.valid, strict=True) if v)
    assert sorted(valid) == list(range(n)) and set(valid.values()) == {1}
    per_rank = [sum(len(p[r, k].batch_sizes) for k in range(workers)) for r in range(world)]
    assert len(set(per_rank)) == 1
    sizes = [sorted(s for k in range(workers) for s in p[r, k].batch_sizes) for r in range(world)]
    assert all(s == sizes[0] for s in sizes)  # same batch sizes on every rank, too


def test_epochs_reshuffle_and_the_same_epoch_repeats():
    a, b, c = (plans(40, 2, 2, 4, train=True, epoch=e) for e in (0, 0, 1))
    assert all(a[k].positions == b[k].positions for k in a)
    assert any(a[k].positions != c[k].positions for k in a)
    assert not np.array_equal(shard_order(16, 1, 0, True), shard_order(16, 1, 1, True))
    np.testing.assert_array_equal(shard_order(16, 1, 0, False), np.arange(16))


def test_resume_drops_exactly_the_consumed_batches():
    full = plans(60, 2, 3, 4, train=True)
    for consumed in (1, 2, 4, 7):
        resumed = plans(60, 2, 3, 4, train=True, consumed=consumed)
        for key, plan in resumed.items():
            done = sum(1 for j in full[key].batch_indices if j < consumed)
            assert plan.positions == full[key].positions[done * 4 :]
            assert plan.batch_indices == full[key].batch_indices[done:]
            assert plan.skipped == done * 4


def global_batches_of(n, world, workers, micro, accumulation, *, consumed=0, epoch=0, switches=()):
    """The epoch's global batches as the ranks' workers produce them: step s is rank 0's micro-batches
    s*A .. s*A+A-1, then rank 1's, and so on (what an optimizer step averages over)."""
    p = plans(n, world, workers, micro, train=True, accumulation=accumulation, consumed=consumed, epoch=epoch,
              switches=switches)  # fmt: skip
    per_rank: dict[int, dict[int, list[int]]] = {r: {} for r in range(world)}
    for (r, _), plan in p.items():
        for j, start in zip(plan.batch_indices, range(0, len(plan.positions), micro), strict=True):
            per_rank[r][j] = plan.positions[start : start + micro]
    steps = batches_per_rank(n, BatchGeometry(micro, accumulation, world), True, switches) // accumulation
    first = consumed // accumulation
    return [
        [x for r in range(world) for a in range(accumulation) for x in per_rank[r][s * accumulation + a]]
        for s in range(first, steps)
    ]


@pytest.mark.parametrize("n", [70, 64, 100, 37, 200])
def test_the_order_depends_on_the_global_batch_only(n):
    """Global batch 8 on 1, 2, 4 and 8 ranks, any worker count and micro/accumulation split: the same
    samples in the same order at every step."""
    reference = global_batches_of(n, 1, 1, 8, 1)
    assert len(reference) == n // 8 and all(len(b) == 8 for b in reference)
    assert len({x for b in reference for x in b}) == 8 * len(reference)
    for world, workers, micro, acc in [(1, 3, 4, 2), (2, 1, 4, 1), (2, 2, 2, 2), (4, 2, 2, 1), (8, 3, 1, 1)]:
        assert global_batches_of(n, world, workers, micro, acc) == reference, (world, workers, acc)


def test_an_elastic_resume_continues_the_order_on_another_world_size():
    """Stopped after 3 of 8 global batches on 2 ranks, resumed on 1 rank (accumulation 2) for 2 more,
    then on 4 ranks: every step is the uninterrupted run's."""
    straight = global_batches_of(64, 2, 2, 4, 1)
    first = global_batches_of(64, 2, 2, 4, 1)[:3]
    second = global_batches_of(64, 1, 1, 4, 2, consumed=3 * 2)[:2]
    third = global_batches_of(64, 4, 2, 2, 1, consumed=5)
    assert first + second + third == straight


def test_a_global_batch_change_mid_epoch_reads_the_rest_of_the_epoch_once():
    """Stopped after 3 of 6 global batches of 16 (100 samples), continued with batches of 12 on 3 ranks,
    then (after 2 of those) with batches of 8 on 1 rank: every sample the epoch had not read yet is read
    exactly once, fewer than one batch left out at the end; resumed positions equal the straight run."""
    first = global_batches_of(100, 4, 2, 4, 1)[:3]
    switch = ((16, 3),)
    second_all = global_batches_of(100, 3, 2, 4, 1, consumed=3, switches=switch)
    assert len(second_all) == (100 - 48) // 12 and all(len(b) == 12 for b in second_all)
    assert global_batches_of(100, 1, 1, 4, 3, consumed=9, switches=switch) == second_all  # same on any world
    second = second_all[:2]
    third = global_batches_of(100, 1, 2, 8, 1, consumed=5, switches=switch + ((12, 5),))
    read = [x for b in first + second + third for x in b]
    assert len(read) == len(set(read)) and 100 - len(read) < 8
    assert set(read) <= set(range(100))
    # the epoch's sequence goes on where it stopped: what the straight run of 16 reads is read here too
    assert {x for b in global_batches_of(100, 4, 2, 4, 1) for x in b} <= set(read)
    assert epoch_order(100, 12, seed=1, epoch=0, shuffle=True, switches=switch)[:3].tolist() == [[-1] * 12] * 3
    with pytest.raises(ValueError, match="before the last global batch switch"):
        plans(100, 3, 1, 4, train=True, consumed=2, switches=switch)


def test_rank_batches_are_uniform_draws_with_no_period():
    """A rank's consecutive batches are as mixed as uniform draws: no slot returns to the same run of
    positions a fixed number of batches later (the old interleaved order's period of 8)."""
    order = epoch_order(4096, 32, seed=1, epoch=0, shuffle=True)
    assert sorted(order.ravel()) == sorted(set(order.ravel())) and order.size == 4096
    group = order // 64  # 64 "scenes" of 64 stored samples
    rank0 = group[:, :4]  # rank 0 of 8, micro-batch 4
    same_8_later = np.mean([len(set(rank0[b]) & set(rank0[b + 8])) > 0 for b in range(len(rank0) - 8)])
    assert same_8_later < 0.35  # uniform: 1 - (60/64 * 59/63 ...) ~ 0.23; the interleaved order: ~0.9
    assert not np.array_equal(order, epoch_order(4096, 32, seed=1, epoch=1, shuffle=True))
    plain = epoch_order(64, 8, seed=1, epoch=0, shuffle=False)
    np.testing.assert_array_equal(plain[1], np.arange(8, 16))  # no shuffling: storage order


def test_buffer_shuffle_is_a_bounded_permutation():
    rng = np.random.default_rng(0)
    order = buffer_shuffle(200, 16, rng)
    assert sorted(order) == list(range(200)) and order != list(range(200))
    # an input is emitted only after it entered the buffer, and never waits behind more than 16 reads
    for out_pos, item in enumerate(order):
        assert item <= out_pos + 15
    assert buffer_shuffle(10, 1, rng) == list(range(10))


def test_locate_maps_positions_to_shards():
    counts = [3, 1, 2]
    order = np.array([2, 0, 1])
    assert locate(range(6), counts, order) == [(2, 0), (2, 1), (0, 0), (0, 1), (0, 2), (1, 0)]


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill one global batch of 8"):
        batches_per_rank(7, BatchGeometry(4, 1, 2), True)


def test_the_unused_samples_change_from_epoch_to_epoch():
    """drop_last leaves out the tail of each epoch's shard order: other samples every epoch."""
    counts, global_batch = [10] * 10, 16  # 100 samples, 6 global batches: 4 unused

    def unused(epoch: int) -> set[tuple[int, int]]:
        used = epoch_order(100, global_batch, seed=2, epoch=epoch, shuffle=True).ravel()
        slots = set(locate(used, counts, shard_order(10, 2, epoch, True)))
        return {(s, i) for s in range(10) for i in range(10)} - slots

    sets = [unused(e) for e in range(4)]
    assert all(len(s) == 100 % global_batch for s in sets)
    assert len({frozenset(s) for s in sets}) == 4
