"""Every collective of the package, in one place that knows which process group takes which device.

Why one place: on GPUs DeepSpeed creates an NCCL-only process group, and NCCL refuses CPU tensors
("No backend type associated with device type cpu"). The trainer's control traffic lives on the host
(the stop flag, data counters, small Python objects for checkpoints and evaluation), so handing it to
the default group crashes every run of two or more GPUs at its first step. Two kinds of collective:

- **control** (host values): ``any_rank``, ``sum_counts``, ``broadcast_object``, ``all_gather_object``,
  ``barrier``. They run on CPU tensors over the *control group*: the default group when it has a CPU
  backend (gloo, or a ``cpu:gloo,cuda:nccl`` group), otherwise a gloo group made once beside it by
  :func:`init_control_group`. No device synchronisation for a flag, and no GPU memory for objects.
- **device** (model tensors: buffers, metric state): ``all_reduce``, ``broadcast_``. They run on the
  default group, on :func:`comm_device`, chosen the same on every rank (never from where one rank's
  tensor happens to be: a rank that saw no batch holds CPU metric state while the others hold CUDA).

Everything is a no-op without an initialised process group, and runs the real collective otherwise,
also in a group of one, so a one-GPU run exercises the same path as a multi-node one.
``tests/test_comm.py`` checks that no other module calls a ``torch.distributed`` collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed", "rank", "world_size", "init_control_group", "control_group", "comm_device",
    "all_reduce", "broadcast_", "any_rank", "sum_counts", "broadcast_object", "all_gather_object", "barrier",
]

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_control: dist.ProcessGroup | None = None
_control_of: dist.ProcessGroup | None = None  # the default group the control group was made for


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _device_types(group: dist.ProcessGroup | None = None) -> set[str]:
    """Device types the group has a backend for: ``"cuda:nccl"`` -> {cuda}, ``"gloo"`` -> {cpu, cuda}."""
    config = dist.get_backend_config(group)
    return {part.split(":")[0] for part in config.split(",") if ":" in part}


def init_control_group() -> None:
    """Make the control group (a collective when one has to be created: call it on every rank,
    right after the default group exists; ``init_distributed`` does)."""
    global _control, _control_of
    if not is_distributed():
        return
    world = dist.group.WORLD
    if _control is not None and _control_of is world:
        return
    _control = world if "cpu" in _device_types(world) else dist.new_group(backend="gloo")
    _control_of = world


def control_group() -> dist.ProcessGroup:
    """The group for host-side control collectives (made on first use if ``init_control_group`` was
    not called; every rank reaches its first control collective at the same point, so that is safe)."""
    init_control_group()
    return _control


def comm_device() -> torch.device:
    """Where device collectives put their tensors: the accelerator when the default group has a
    backend for it and one is present, else the CPU. The same answer on every rank."""
    types = _device_types()
    if torch.cuda.is_available() and "cuda" in types:
        return torch.device("cuda", torch.cuda.current_device())
    if "cpu" in types:
        return torch.device("cpu")
    raise RuntimeError(f"the default process group ({dist.get_backend_config()}) has no backend for the CPU "
                       "and no usable accelerator is visible; start the job with one GPU per rank")


# -- device collectives --------------------------------------------------------------------------
def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    """``tensor`` reduced over ranks (``op``: sum | max | min), on the comm device; ``tensor`` itself
    is left unchanged when it had to be moved, reduced in place when it was already there."""
    if not is_distributed():
        return tensor
    work = tensor.to(comm_device()).contiguous()
    dist.all_reduce(work, op=_OPS[op])
    return work


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s value."""
    if not is_distributed():
        return tensor
    device = comm_device()
    if tensor.device == device and tensor.is_contiguous():
        dist.broadcast(tensor, src=src)
        return tensor
    work = tensor.to(device).contiguous()
    dist.broadcast(work, src=src)
    return tensor.copy_(work)


# -- control collectives (host values, control group) -------------------------------------------
def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=control_group())
    return bool(value.item())


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Integer counters summed over ranks (every rank must pass the same keys)."""
    if not is_distributed():
        return dict(counts)
    keys = sorted(counts)
    values = torch.tensor([int(counts[k]) for k in keys], dtype=torch.int64)
    dist.all_reduce(values, group=control_group())
    return dict(zip(keys, values.tolist()))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable, small) on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=control_group(), device=torch.device("cpu"))
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        dist.barrier(group=control_group())
