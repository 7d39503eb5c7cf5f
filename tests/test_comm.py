"""Collectives: every control collective reaches a backend that takes host tensors.

On GPUs the default group is NCCL-only and refuses CPU tensors. A group made with
``backend="cuda:gloo"`` has exactly that constraint on a CPU machine ("No backend type associated with
device type cpu"), so two ranks in such a group run the package's control paths here as they would run
under NCCL. A static check keeps every other module from calling ``torch.distributed`` directly.
"""

from __future__ import annotations

import ast
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PACKAGE = Path(__file__).resolve().parents[1] / "mtlora_dist"
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int, backend: str):
    """Join a two-rank group in a spawned process; returns the package's comm module."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=2)
    from mtlora_dist import comm

    return comm


def _control_paths(rank: int, port: int, results) -> None:
    """One rank of a ``cuda:gloo`` group: the group refuses CPU tensors, the package's control paths work."""
    comm = _join(rank, port, "cuda:gloo")
    from mtlora_dist.engine.signals import TerminationFlag

    out: dict = {}
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as error:  # the constraint is real in this group
        out["refused"] = "No backend type associated with device type cpu" in str(error)
    comm.init_control_group()
    stop = TerminationFlag()
    out["before_signal"] = stop.should_stop()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told to stop
    out["after_signal"] = stop.should_stop()
    out["counts"] = comm.sum_counts({"skipped": rank + 1, "corrupt": 10 * rank})
    out["object"] = comm.broadcast_object({"tag": "step_7"} if rank == 0 else None)
    out["gathered"] = comm.all_gather_object(rank * 2)
    comm.barrier()
    results[rank] = out
    dist.destroy_process_group()


def _on_two_ranks(worker) -> list[dict]:
    """Run ``worker(rank, port, results)`` in two spawned processes; their results in rank order."""
    results = mp.Manager().dict()
    mp.spawn(worker, args=(_free_port(), results), nprocs=2, join=True)
    return [results[rank] for rank in (0, 1)]


def test_control_collectives_work_in_a_group_that_refuses_cpu_tensors():
    for got in _on_two_ranks(_control_paths):
        assert got["refused"] is True
        assert got["before_signal"] is False and got["after_signal"] is True
        assert got["counts"] == {"skipped": 3, "corrupt": 10}
        assert got["object"] == {"tag": "step_7"}
        assert got["gathered"] == [0, 2]


def _device_choice(rank: int, port: int, results) -> None:
    comm = _join(rank, port, "gloo")
    comm.init_control_group()
    reduced = comm.all_reduce(torch.tensor([rank + 1.0]), op="max")
    buffer = torch.full((3,), float(rank))
    comm.broadcast_(buffer[::2], src=1)  # a non-contiguous view is written back in place
    results[rank] = {
        "device": str(comm.comm_device()),
        "reduced": reduced.tolist(),
        "buffer": buffer.tolist(),
        "control_is_world": comm.control_group() is dist.group.WORLD,
    }
    dist.destroy_process_group()


def test_device_collectives_and_the_control_group_under_gloo():
    for rank, got in enumerate(_on_two_ranks(_device_choice)):
        assert got["device"] == "cpu" and got["reduced"] == [2.0]
        assert got["buffer"] == [1.0, float(rank), 1.0]
        assert got["control_is_world"] is True  # gloo takes CPU tensors: no second group


def test_without_a_process_group_everything_is_local():
    from mtlora_dist import comm

    assert not comm.is_distributed()
    assert comm.any_rank(True) and not comm.any_rank(False)
    assert comm.sum_counts({"a": 2}) == {"a": 2}
    assert comm.all_gather_object(5) == [5] and comm.broadcast_object("x") == "x"


# -- static: only mtlora_dist/comm.py talks to torch.distributed ---------------------------------
def _distributed_uses(tree: ast.AST) -> list[str]:
    """Imports of torch.distributed / deepspeed.comm and ``torch.distributed.<name>`` accesses."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith(("torch.distributed", "deepspeed.comm"))]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(("torch.distributed", "deepspeed.comm")) or (
                node.module in ("torch", "deepspeed") and any(a.name in ("distributed", "comm") for a in node.names)
            ):
                found.append(f"from {node.module} import ...")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "distributed"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            found.append("torch.distributed")
    return found


def test_no_module_but_comm_calls_torch_distributed():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "comm.py" and path.parent == PACKAGE:
            continue
        uses = _distributed_uses(ast.parse(path.read_text(), filename=str(path)))
        if uses:
            offenders[str(path.relative_to(PACKAGE.parent))] = uses
    assert not offenders, f"use mtlora_dist.comm instead of torch.distributed in: {offenders}"


def test_the_static_check_sees_the_usual_spellings():
    source = "import torch.distributed as dist\nfrom torch import distributed\nx = torch.distributed.get_rank()\n"
    assert len(_distributed_uses(ast.parse(source))) == 3
