"""Every collective of the package, in one place that knows which process group takes which device.

Why one place: on GPUs DeepSpeed creates an NCCL-only process group, and NCCL refuses CPU tensors
("No backend type associated with device type cpu"). The trainer's control traffic lives on the host
(the stop flag, data counters, small Python objects for checkpoints and evaluation), so handing it to
the default group crashes every run of two or more GPUs at its first step. Two kinds of collective:

- **control** (host values): ``any_rank``, ``sum_counts``, ``broadcast_object``, ``all_gather_object``,
  ``barrier``. They run on CPU tensors over the *control group*: the default group when it has a CPU
  backend (gloo, or a ``cpu:gloo,cuda:nccl`` group), otherwise a gloo group made once beside it by
  :func:`init_control_group`. No device synchronisation for a flag, and no GPU memory for objects.
- **device** (model tensors: buffers, metric state, SyncBN moments): ``all_reduce``, ``broadcast_``,
  ``all_reduce_with_grad``. They run on the default group, on :func:`comm_device`, chosen the same on
  every rank (never from where one rank's tensor happens to be: a rank that saw no batch holds CPU
  metric state while the others hold CUDA).

Everything is a no-op without an initialised process group, and runs the real collective otherwise,
also in a group of one, so a one-GPU run exercises the same path as a multi-node one.
``tests/test_comm.py`` checks that no other module calls a ``torch.distributed`` collective.

**Lost peers.** When a rank dies, its sockets close and the next collective of every other rank fails
with a transport error (gloo: "Connection closed by peer"). :func:`peer_loss_as_error` turns that into
one :class:`PeerLostError` naming the dead rank, so a survivor exits at once with a message instead of
a traceback, and never waits for its launcher's SIGKILL (the deepspeed launcher and torchrun give up
on a terminated rank after 30 s).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "init_default_group",
    "init_control_group",
    "control_group",
    "comm_device",
    "all_reduce",
    "all_reduce_with_grad",
    "broadcast_",
    "any_rank",
    "sum_counts",
    "broadcast_object",
    "all_gather_object",
    "barrier",
    "PeerLostError",
    "peer_loss_as_error",
    "broadcast_buffers",
]

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_control: dist.ProcessGroup | None = None
_control_of: dist.ProcessGroup | None = None  # the default group the control group was made for
_peers: list[tuple[str, int]] = []  # (host, pid) of every rank, gathered once with the control group
_timeout: timedelta | None = None  # the process groups' timeout, for the message when it expires


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


def shutdown() -> None:
    """Leave every process group (and DeepSpeed's references to them) before the process exits: a group
    left to interpreter exit can abort it ("terminate called without an active exception", status 134
    instead of 0 or 3), and a later group in the same process must not meet stale ones."""
    global _control, _control_of, _timeout
    if is_distributed():
        deepspeed_comm = sys.modules.get("deepspeed.comm")
        if deepspeed_comm is not None and deepspeed_comm.is_initialized():
            deepspeed_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
    _control = _control_of = _timeout = None
    _peers.clear()


def init_default_group(backend: str, timeout: timedelta, device: torch.device | None = None) -> None:
    """Make the default group from the launcher's environment (``env://``), bound to ``device`` when
    one is given (torch's eager, device-bound init; ``engine.distributed`` decides when)."""
    dist.init_process_group(backend, timeout=timeout, **({"device_id": device} if device is not None else {}))


def init_control_group(timeout: timedelta | None = None) -> None:
    """Make the control group (a collective when one has to be created: call it on every rank,
    right after the default group exists; ``init_distributed`` does, with the default group's
    ``timeout``, so a control collective gives up on a silent peer as soon as a device one does)."""
    global _control, _control_of, _timeout
    if not is_distributed():
        return
    world = dist.group.WORLD
    if _control is not None and _control_of is world:
        return
    _timeout = timeout
    _control = world if "cpu" in _device_types(world) else dist.new_group(backend="gloo", timeout=timeout)
    _control_of = world
    _peers[:] = all_gather_object((socket.gethostname(), os.getpid()))


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
    raise RuntimeError(
        f"the default process group ({dist.get_backend_config()}) has no backend for the CPU "
        "and no usable accelerator is visible; start the job with one GPU per rank"
    )


# -- device collectives --------------------------------------------------------------------------
def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    """``tensor`` reduced over ranks (``op``: sum | max | min), on the comm device; ``tensor`` itself
    is left unchanged when it had to be moved, reduced in place when it was already there."""
    if not is_distributed():
        return tensor
    work = tensor.to(comm_device()).contiguous()
    dist.all_reduce(work, op=_OPS[op])
    return work


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of every rank's gradient: each rank's output feeds every
    rank's loss, so each input receives all of them (the backward of torch's SyncBatchNorm in spirit)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        return _summed_copy(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _summed_copy(grad)


def _summed_copy(tensor: Tensor) -> Tensor:
    """A new tensor on ``tensor``'s device holding its sum over ranks (``tensor`` itself unchanged)."""
    work = tensor.to(comm_device(), copy=True).contiguous()
    dist.all_reduce(work)
    return work.to(tensor.device)


def all_reduce_with_grad(tensor: Tensor) -> Tensor:
    """``tensor`` summed over ranks on the default group, differentiable (gradients are summed too);
    returns a new tensor on ``tensor``'s device. Every rank must call it the same number of times, in
    forward and backward alike."""
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor)


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


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics, which drift apart per rank
    without SyncBatchNorm), so evaluations agree with each other and with what a checkpoint holds."""
    if world_size() > 1:  # nothing to agree on in a group of one
        for buffer in module.buffers():
            if buffer.is_floating_point() or buffer.dtype == torch.int64:
                broadcast_(buffer.data, src=src)


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


# -- lost peers ------------------------------------------------------------------------------------
class PeerLostError(RuntimeError):
    """Another rank of the job stopped while this one needed it; nothing more can be computed or saved."""


# What a collective says when a peer did not answer within the process-group timeout (gloo; NCCL's watchdog).
_TIMEOUT_MARKERS = ("Timed out waiting", "Watchdog caught collective operation timeout")
# What the transports say when the other end of a connection is gone (gloo, NCCL, the TCP store).
_PEER_LOST_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Connection refused",
    "remote process exited",
    "communicator was aborted",
    "Socket Timeout",
    *_TIMEOUT_MARKERS,
)


def _is_peer_loss(err: BaseException) -> bool:
    if world_size() < 2 or not isinstance(err, (RuntimeError, ConnectionError)):
        return False
    return any(marker in str(err) for marker in _PEER_LOST_MARKERS)


def _process_gone(pid: int) -> bool:
    import psutil  # a DeepSpeed dependency

    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


def _dead_ranks(wait_s: float) -> list[int]:
    """Ranks on this host whose process has exited (a dying rank may still be printing: wait a little)."""
    host, me = socket.gethostname(), rank()
    local = [(r, pid) for r, (h, pid) in enumerate(_peers) if h == host and r != me]
    deadline = time.monotonic() + wait_s
    while True:
        dead = [r for r, pid in local if _process_gone(pid)]
        if dead or not local or time.monotonic() > deadline:
            return dead
        time.sleep(0.1)


def _peer_lost_message(err: BaseException, wait_s: float) -> str:
    dead = _dead_ranks(wait_s)
    if dead:
        who = ", ".join(f"rank {r} (pid {_peers[r][1]})" for r in dead) + (" has" if len(dead) == 1 else " have")
        who += " exited"
        where = f"the output of rank {dead[0]}"
    else:
        remote = sorted({h for h, _ in _peers if h != socket.gethostname()})
        who = f"a rank on another host ({', '.join(remote)}) has stopped" if remote else "a peer rank has stopped"
        if any(m in str(err) for m in _TIMEOUT_MARKERS):
            waited = f"{_timeout.total_seconds():g} s, " if _timeout else ""
            who += f" answering (no reply within the process-group timeout: {waited}deepspeed.process_group_timeout_s)"
        where = "the other ranks' output"
    said = next((m for m in _PEER_LOST_MARKERS if m in str(err)), type(err).__name__)
    return (
        f"rank {rank()}: {who} (the connection to it: {said}). Stopping this rank too, without a checkpoint; "
        f"the newest complete checkpoint in run_dir stands. Find the first error in {where}, then run the "
        "same command to resume."
    )


@contextlib.contextmanager
def peer_loss_as_error(wait_s: float = 3.0) -> Iterator[None]:
    """Inside this block, a collective that fails because another rank is gone raises one
    :class:`PeerLostError` naming that rank (found by pid on this host) instead of a transport error."""
    try:
        yield
    except PeerLostError:
        raise
    except Exception as err:  # noqa: BLE001  (DeepSpeed's collectives raise plain RuntimeErrors)
        if not _is_peer_loss(err):
            raise
        raise PeerLostError(_peer_lost_message(err, wait_s)) from None
