"""``deepspeed.dist_backend``: the default process group's backend from config. ``cuda:gloo`` is how the
prepared GPU run puts two ranks on one GPU with a default group that refuses CPU tensors as NCCL does;
here, on a CPU, the same group is made through ``init_distributed`` and refuses exactly that, while the
control traffic still flows."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from mtlora_dist.config import DeepSpeedSettings
from mtlora_dist.engine.distributed import default_group_backend, free_port

pytestmark = pytest.mark.integration


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch.distributed as dist

    from mtlora_dist import comm
    from mtlora_dist.engine.distributed import init_distributed

    info = init_distributed(timeout_s=60, backend="cuda:gloo")
    out: dict = {"world": info.world_size}
    try:
        dist.all_reduce(torch.ones(1))
        out["refused"] = False
    except RuntimeError as error:
        out["refused"] = "No backend type associated with device type cpu" in str(error)
    out["counts"] = comm.sum_counts({"seen": rank + 1})
    results[rank] = out


def test_a_cuda_gloo_default_group_refuses_cpu_tensors_and_keeps_control_traffic():
    port, results = free_port(), mp.Manager().dict()
    mp.spawn(_rank, args=(port, results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank] == {"world": 2, "refused": True, "counts": {"seen": 3}}


def test_backend_choice_and_its_validation():
    assert default_group_backend("auto", torch.device("cpu")) == "gloo"
    assert default_group_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert default_group_backend("cuda:gloo", torch.device("cuda", 0)) == "cuda:gloo"
    with pytest.raises(ValueError, match="deepspeed.dist_backend is 'mpi'; pass one of auto, nccl, gloo, cuda:gloo"):
        DeepSpeedSettings(dist_backend="mpi")
