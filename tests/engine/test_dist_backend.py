"""``deepspeed.dist_backend``: the default process group's backend from config. ``cuda:gloo`` is how the
prepared GPU run puts two ranks on one GPU with a default group that refuses CPU tensors as NCCL does;
here, on a CPU with a faked one-GPU CUDA torch, the same group is made through ``init_distributed``,
binds both ranks to cuda:0 and refuses CPU tensors, while the control traffic still flows."""

from __future__ import annotations

import pytest
import torch

from mtlora_dist.config import DeepSpeedSettings
from mtlora_dist.engine.distributed import default_group_backend

pytestmark = pytest.mark.integration


def test_backend_choice_and_its_validation():
    assert default_group_backend("auto", torch.device("cpu")) == "gloo"
    assert default_group_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert default_group_backend("cuda:gloo", torch.device("cuda", 0)) == "cuda:gloo"
    with pytest.raises(ValueError, match="deepspeed.dist_backend is 'mpi'; pass one of auto, nccl, gloo, cuda:gloo"):
        DeepSpeedSettings(dist_backend="mpi")


# -- two ranks on one GPU, with DeepSpeed's CUDA accelerator, faked on a CPU -----------------------------
def test_two_ranks_on_one_faked_gpu_bind_it_where_deepspeed_failed():
    """DeepSpeed 0.19.8 binds its group to ``cuda:LOCAL_RANK`` (``deepspeed/comm/torch.py``); with one
    visible GPU torch refuses ``cuda:1``. ``benchmarks/cuda_rehearsal.py`` fakes a one-device CUDA torch in
    real rank processes (DS_ACCELERATOR unset: DeepSpeed picks CUDA itself): the direct DeepSpeed call fails
    as on the GPU machine; ``init_distributed`` binds cuda:0 on both ranks, and DeepSpeed adopts the
    group and takes cuda:0 for its engine, while the launcher's local rank is kept."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from cuda_rehearsal import judge, rehearse

    (unpatched,) = rehearse(ranks=2, gpus=1, unpatched_ranks=(1,))
    assert unpatched["accelerator"] == "cuda"
    assert "device_id cuda:1 is out of range" in unpatched["error"], unpatched
    results = rehearse(ranks=2, gpus=1)
    assert judge(results, gpus=1), results
    assert [(r["local_rank"], r["device"], r["deepspeed_engine_device"]) for r in results] == [
        (0, "cuda:0", "cuda:0"),
        (1, "cuda:0", "cuda:0"),
    ]
    assert {r["backend"] for r in results} == {"cuda:gloo"}


def test_the_group_is_bound_to_our_gpu_only_when_there_are_peers():
    from mtlora_dist.engine.distributed import bound_device

    assert bound_device(torch.device("cuda", 0), world_size=2) == torch.device("cuda", 0)
    assert bound_device(torch.device("cuda", 0), world_size=1) is None  # as DeepSpeed: no peer to split with
    assert bound_device(torch.device("cpu"), world_size=2) is None
