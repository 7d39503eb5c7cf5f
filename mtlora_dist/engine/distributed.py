"""Process-group start-up that works the same under ``deepspeed``, ``torchrun``, ``srun`` and ``python``.

The launchers differ only in which environment variables they set: the deepspeed launcher and
torchrun set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; ``srun`` sets SLURM_PROCID,
SLURM_NTASKS and SLURM_LOCALID (the master is the first host of the allocation); a plain ``python``
run has none and becomes a one-process group.

The default group is made here, not by DeepSpeed, and DeepSpeed adopts it (``deepspeed.init_distributed``
wraps an existing group). DeepSpeed 0.19.8 binds its own group to ``cuda:LOCAL_RANK`` whenever the world
size is not 1 (``deepspeed/comm/torch.py``) and its engine and ZeRO read ``LOCAL_RANK`` as the GPU
index; with more ranks than GPUs on a node (two ranks on one GPU over ``cuda:gloo``) torch refuses
``cuda:1`` ("device_id cuda:1 is out of range"). So each rank binds the device :func:`device_for`
chose, and ``LOCAL_RANK`` is set to that device's index before DeepSpeed reads it; the launcher's
local rank stays in :class:`DistInfo`.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch

from mtlora_dist import comm
from mtlora_dist.engine.host_memory import keep_freed_memory

__all__ = [
    "DistInfo",
    "init_distributed",
    "device_for",
    "default_group_backend",
    "bound_device",
    "free_port",
    "enable_nccl_async_errors",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "127.0.0.1"


def _export_launcher_env(local_rank_arg: int | None) -> None:
    """Fill in the process-group variables (RANK, WORLD_SIZE, ...) from whichever launcher started us."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host())
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    if "RANK" not in env:  # plain python: a group of one
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    if local_rank_arg is not None and "LOCAL_RANK" not in env:
        env["LOCAL_RANK"] = str(local_rank_arg)


def device_for(local_rank: int) -> torch.device:
    """This rank's GPU; with more ranks than GPUs (a ``cuda:gloo`` rehearsal) ranks share them round-robin
    (NCCL itself refuses two ranks on one GPU, with its own message)."""
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def default_group_backend(requested: str, device: torch.device) -> str:
    """``deepspeed.dist_backend``: ``auto`` is NCCL on GPUs and gloo on CPUs; anything else as given."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return requested


def bound_device(device: torch.device, world_size: int) -> torch.device | None:
    """The device the default group is bound to: this rank's GPU when there are peers, as DeepSpeed
    binds it (none for one rank, whose later groups have no peer to split with; none on torch
    2.6.0-2.7.0, where a bound group can hang: pytorch#153960), but chosen by us, not from LOCAL_RANK."""
    if device.type != "cuda" or world_size == 1:
        return None
    from packaging.version import Version

    if Version("2.6.0") < Version(torch.__version__.split("+")[0]) < Version("2.7.1"):
        return None
    return device


def _deepspeed_local_rank(device: torch.device) -> None:
    """DeepSpeed takes ``LOCAL_RANK`` for the GPU index (``engine._set_distributed_vars``, ZeRO's buffers):
    give it the index of the GPU this rank uses, which differs only when ranks share GPUs."""
    if device.type == "cuda":
        os.environ["LOCAL_RANK"] = str(device.index)


def init_distributed(local_rank_arg: int | None = None, timeout_s: float = 600.0, backend: str = "auto") -> DistInfo:
    """Start (or join) the process group: NCCL on GPUs, gloo on CPUs, or ``backend``
    (``deepspeed.dist_backend``). A collective that waits more than ``timeout_s`` for a peer fails on every
    rank (``deepspeed.process_group_timeout_s``) instead of blocking for DeepSpeed's default
    (``DEEPSPEED_TIMEOUT`` minutes, 10 unless set, in 0.19.8)."""
    import deepspeed

    _export_launcher_env(local_rank_arg)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = device_for(local_rank)
    if device.type == "cpu":
        keep_freed_memory()  # CPU steps otherwise page-fault on every large activation
        # DeepSpeed would JIT-compile a shared-memory comm op for CPU ranks (~90 s per machine);
        # plain gloo is enough for our small gradients
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = timedelta(seconds=timeout_s)
    if not comm.is_distributed():
        enable_nccl_async_errors()
        group_backend = default_group_backend(backend, device)
        comm.init_default_group(group_backend, timeout, bound_device(device, int(os.environ["WORLD_SIZE"])))
        _deepspeed_local_rank(device)
        deepspeed.init_distributed(  # adopts the group above
            dist_backend=group_backend,
            auto_mpi_discovery=False,
            verbose=False,
            timeout=timeout,
        )
    comm.init_control_group(timeout)  # host-side control collectives (NCCL refuses CPU tensors)
    return DistInfo(comm.rank(), comm.world_size(), local_rank, device)


def enable_nccl_async_errors() -> None:
    """NCCL's watchdog aborts a collective that outlives the timeout only with asynchronous error handling
    on; without it a rank waiting in a device sync (``.item()``, a stream wait) for a dead peer blocks
    forever. Set before the group exists (NCCL reads it then); a value the user chose stays."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
