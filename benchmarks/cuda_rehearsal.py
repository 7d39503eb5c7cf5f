"""The CUDA start-up path of a multi-rank run, rehearsed on a CPU with a faked one-GPU CUDA device.

    python benchmarks/cuda_rehearsal.py [--ranks 2] [--gpus 1] [--json out.json]

Each rank is a real process that sees ``torch.cuda`` (and ``torch.accelerator``) report ``--gpus``
available devices and records ``torch.cuda.set_device`` instead of calling the driver; nothing else is
faked. It then runs what a rank runs on the GPU machine: DeepSpeed's own accelerator selection
(``DS_ACCELERATOR`` unset, as there), ``engine.distributed.init_distributed(backend="cuda:gloo")`` with
the launcher's RANK/WORLD_SIZE/LOCAL_RANK, and DeepSpeed's engine choice of device
(``DeepSpeedEngine._set_distributed_vars``, which reads ``LOCAL_RANK``). It records, per rank: the
accelerator DeepSpeed chose, the device bound to the default group, the device DeepSpeed's engine
would use, whether the ``cuda:gloo`` group refuses a CPU tensor (as NCCL does) and whether the gloo
control group still carries host-side traffic. With ``--unpatched`` a rank calls
``deepspeed.init_distributed`` directly, as the code did before: with two ranks on one GPU, rank 1
fails there with torch's "device_id cuda:1 is out of range" (DeepSpeed 0.19.8 binds ``cuda:LOCAL_RANK``).

Exit status 0 when every rank's device is ``cuda:(local_rank % gpus)`` everywhere it is read.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]


def fake_cuda(gpus: int) -> list[int]:
    """Make this process's torch report ``gpus`` CUDA devices; returns the list ``set_device`` appends to."""
    import torch

    calls: list[int] = []
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: gpus
    torch.accelerator.device_count = lambda: gpus  # what init_process_group checks device_id against

    def set_device(device) -> None:
        index = torch.device(device).index if not isinstance(device, int) else device
        if index is None or index >= gpus:
            raise RuntimeError(f"CUDA error: invalid device ordinal ({device} with {gpus} device(s))")
        calls.append(index)

    torch.cuda.set_device = set_device
    return calls


def _rank(rank: int, ranks: int, gpus: int, port: int, unpatched: bool, results) -> None:
    os.environ.pop("DS_ACCELERATOR", None)  # DeepSpeed chooses, as on the GPU machine
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(ranks),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(ranks),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CUDA_VISIBLE_DEVICES="",  # a real CUDA runtime, if there is one, stays out of it
    )
    set_device_calls = fake_cuda(gpus)
    out: dict = {"rank": rank}
    try:
        from datetime import timedelta

        import deepspeed
        import torch
        from deepspeed.accelerator import get_accelerator

        out["accelerator"] = get_accelerator().device_name()
        if unpatched:
            deepspeed.init_distributed(
                dist_backend="cuda:gloo", auto_mpi_discovery=False, verbose=False, timeout=timedelta(seconds=30)
            )
            out["error"] = None
            return
        from deepspeed.runtime.engine import DeepSpeedEngine

        from mtlora_dist import comm
        from mtlora_dist.engine.distributed import init_distributed

        info = init_distributed(timeout_s=60, backend="cuda:gloo")
        group = comm.dist.distributed_c10d._get_default_group()
        engine = argparse.Namespace(local_rank=int(os.environ["LOCAL_RANK"]))
        DeepSpeedEngine._set_distributed_vars(engine, None)  # the device DeepSpeed's engine would take
        try:
            comm.dist.all_reduce(torch.ones(1))
            refused = False
        except RuntimeError as error:
            refused = "No backend type associated with device type cpu" in str(error)
        out.update(
            device=str(info.device),
            local_rank=info.local_rank,
            backend=comm.dist.get_backend_config(),
            bound_device=str(group.bound_device_id),
            deepspeed_local_rank=int(os.environ["LOCAL_RANK"]),
            deepspeed_engine_device=str(engine.device),
            deepspeed_world_size=deepspeed.comm.get_world_size(),
            set_device_calls=sorted(set(set_device_calls)),
            cpu_tensor_refused=refused,
            control_counts=comm.sum_counts({"ranks": 1}),
            error=None,
        )
        comm.shutdown()
    except Exception as error:  # noqa: BLE001 - recorded for the caller, which judges it
        out["error"] = f"{type(error).__name__}: {error}"
        out["traceback"] = traceback.format_exc()[-2000:]
    finally:
        results[rank] = out


def rehearse(ranks: int = 2, gpus: int = 1, unpatched_ranks: tuple[int, ...] = ()) -> list[dict]:
    """Run ``ranks`` ranks (or only ``unpatched_ranks``, each alone, calling DeepSpeed directly);
    one result per rank that ran."""
    import torch.multiprocessing as mp

    from mtlora_dist.engine.distributed import free_port

    results = mp.Manager().dict()
    if unpatched_ranks:  # each fails (or not) before the rendezvous; alone, it cannot wait for peers
        for rank in unpatched_ranks:
            _spawn_one(rank, ranks, gpus, results)
        return [results[r] for r in unpatched_ranks]
    mp.spawn(_all_ranks, args=(ranks, gpus, free_port(), results), nprocs=ranks, join=True)
    return [results[r] for r in range(ranks)]


def _all_ranks(rank: int, ranks: int, gpus: int, port: int, results) -> None:
    _rank(rank, ranks, gpus, port, False, results)


def _spawn_one(rank: int, ranks: int, gpus: int, results) -> None:
    """One rank alone in a fresh process, calling DeepSpeed's start-up directly."""
    import torch.multiprocessing as mp

    from mtlora_dist.engine.distributed import free_port

    proc = mp.get_context("spawn").Process(target=_rank, args=(rank, ranks, gpus, free_port(), True, results))
    proc.start()
    proc.join(120)


def judge(results: list[dict], gpus: int) -> bool:
    """Every rank on ``cuda:(rank % gpus)`` wherever the device is read, the group refusing CPU tensors,
    control traffic summed over all ranks, DeepSpeed on its CUDA accelerator and in the same group."""
    ranks = len(results)
    for r in results:
        expected = f"cuda:{r['rank'] % gpus}"
        if r.get("error") or not (
            r["accelerator"] == "cuda"
            and r["device"] == r["bound_device"] == r["deepspeed_engine_device"] == expected
            and r["deepspeed_local_rank"] == r["rank"] % gpus
            and r["local_rank"] == r["rank"]
            and r["set_device_calls"] == [r["rank"] % gpus]
            and r["cpu_tensor_refused"]
            and r["control_counts"] == {"ranks": ranks}
            and r["deepspeed_world_size"] == ranks
        ):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from common import emit

    results = rehearse(args.ranks, args.gpus)
    unpatched = rehearse(args.ranks, args.gpus, unpatched_ranks=(args.ranks - 1,))[0]
    result = {
        "ranks": results,
        "passed": judge(results, args.gpus),
        "without_fix": unpatched.get("error"),  # what DeepSpeed's own group start-up does on the last rank
    }
    emit(result, args.json)
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # its status, never a process group's teardown abort
