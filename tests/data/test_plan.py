"""Epoch planning: coverage, equal batch counts, determinism, resume arithmetic."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mtlora_dist.data.plan import batches_per_rank, buffer_shuffle, locate, make_worker_plan, shard_order

LAYOUTS = [(37, 2, 2, 4), (40, 3, 4, 5), (24, 2, 1, 3), (100, 4, 3, 7)]
EVAL_LAYOUTS = LAYOUTS + [(5, 4, 3, 2), (3, 4, 2, 2)]  # also: fewer samples than ranks


def plans(n, world, workers, batch, *, train, epoch=0, consumed=0, buffer=8):
    return {
        (r, k): make_worker_plan(
            n,
            world_size=world,
            rank=r,
            num_workers=workers,
            worker=k,
            batch_size=batch,
            seed=1,
            epoch=epoch,
            shuffle=train,
            drop_last=train,
            shuffle_buffer=buffer,
            batches_consumed=consumed,
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
    per_rank = [sum(len(p[r, k].batch_sizes) for k in range(workers)) for r in range(world)]
    assert per_rank == [batches_per_rank(n, world, batch, True)] * world
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
    with pytest.raises(ValueError, match="cannot fill one batch"):
        batches_per_rank(7, 2, 4, True)
