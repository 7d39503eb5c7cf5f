"""Two gloo ranks, each evaluating half the batches, give the single-process result on all of them."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mtlora_dist.tasks.evaluation import MultiTaskEvaluator
from mtlora_dist.tasks.metrics import SegmentationMetric
from mtlora_dist.tasks.registry import BUILTIN_DATASETS, DATASET_TASKS, get_task

IGNORE = 255
NUM_BATCHES = 6


def _batch(dataset: str, index: int) -> tuple[dict, dict]:
    """A deterministic batch with labels padded to the batch maximum and per-sample label sizes."""
    g = torch.Generator().manual_seed(1000 * index + len(dataset))
    b, h, w = 3, 12, 10  # prediction (input) size
    sizes = torch.tensor([[14, 9], [10, 13], [14, 9]])  # true label sizes; pad to 14 x 13
    hmax, wmax = sizes.max(0).values.tolist()
    preds, batch = {}, {"label_size": sizes}
    for task in DATASET_TASKS[dataset]:
        k = get_task(task).outputs_for(dataset)
        preds[task] = torch.randn(b, k, h, w, generator=g) * 2
        if task == "normals":
            label = F.normalize(torch.randn(b, 3, hmax, wmax, generator=g), dim=1)
        elif task == "depth":
            label = torch.rand(b, hmax, wmax, generator=g) * 5
            label[:, :2] = 0.0  # no depth
        else:
            high = k if k > 1 else 2
            label = torch.randint(0, high, (b, hmax, wmax), generator=g).to(torch.uint8)
        for i, (sh, sw) in enumerate(sizes.tolist()):  # padding and some ignored pixels
            label[i, ..., sh:, :] = IGNORE
            label[i, ..., :, sw:] = IGNORE
        label[..., 0, :] = IGNORE
        if task == "human_parts" and index % 2 == 0:
            label[:] = IGNORE  # batches without a person
        batch[task] = label
    return preds, batch


def _evaluate(dataset: str, indices) -> dict:
    ev = MultiTaskEvaluator(list(DATASET_TASKS[dataset]), dataset)
    cm = SegmentationMetric(get_task("semseg").outputs_for(dataset))
    for i in indices:
        preds, batch = _batch(dataset, i)
        ev.update(preds, batch)
        cm.update(preds["semseg"][:, :, :10, :9], batch["semseg"][:, :10, :9])
    results = ev.compute()
    cm.all_reduce()  # in place, as a caller without the evaluator would do
    results["semseg_inplace"] = cm.compute()
    return results


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        shard = range(rank, NUM_BATCHES, world)  # each rank its own half of the batches
        results = {d: _evaluate(d, shard) for d in sorted(BUILTIN_DATASETS)}
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_close(dist_value, single_value, where: str) -> None:
    if isinstance(single_value, dict):
        assert dist_value.keys() == single_value.keys(), where
        for key in single_value:
            _assert_close(dist_value[key], single_value[key], f"{where}.{key}")
    elif isinstance(single_value, float) and math.isnan(single_value):
        assert math.isnan(dist_value), where
    elif isinstance(single_value, float):
        assert dist_value == pytest.approx(single_value, abs=1e-6), where
    else:
        assert dist_value == single_value, where


@pytest.mark.integration
def test_two_gloo_ranks_equal_single_process(tmp_path):
    out_path = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out_path), nprocs=2, join=True, start_method="spawn")
    distributed = torch.load(out_path)
    for dataset in sorted(BUILTIN_DATASETS):
        single = _evaluate(dataset, range(NUM_BATCHES))
        _assert_close(distributed[dataset], single, dataset)
        assert single["delta_m"] is None or not math.isnan(single["delta_m"])
    assert distributed["pascal_context"]["delta_m"] is not None  # PASCAL has default baselines
    assert distributed["nyud"]["delta_m"] is None
