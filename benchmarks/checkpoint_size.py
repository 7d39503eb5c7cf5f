"""How big is a checkpoint? Ours (trainable state only) against DeepSpeed's default (frozen weights too).

    python benchmarks/checkpoint_size.py --frozen 28000000 --trainable 1500000 --write-doc docs/performance-checkpoint.md
    python benchmarks/checkpoint_size.py --model my_pkg.models:build_model --write-doc docs/performance-checkpoint.md

The first form builds a synthetic model (frozen ``Linear`` blocks with trainable low-rank adapters and a
trainable head) of about the given sizes; ``--model`` takes ``module:callable`` returning an ``nn.Module``
whose frozen parameters already have ``requires_grad=False`` (e.g. the real MTLoRA Swin). Runs as one
rank on the CPU (DeepSpeed ZeRO-2, AdamW, fp32) unless started by the ``deepspeed`` launcher.

Expected size of ours: trainable parameters x 12 bytes = 4 (the fp32 master copy; the training-dtype weights
are derived from it) + 8 (Adam's two moments), plus buffers, a few KB of metadata and the pieces' state.
``--s3`` also times a save to a loopback S3 server: how long the loop is held (the local snapshot) and how
long the background upload takes after it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

import torch  # noqa: E402
from torch import nn  # noqa: E402

BYTES_PER_TRAINABLE = {"fp32_master": 4, "adam_moments": 8}


class SyntheticAdapted(nn.Module):
    """``blocks`` frozen ``Linear(dim, dim)`` layers, each with a trainable rank-``rank`` adapter, plus a head."""

    def __init__(self, dim: int, blocks: int, rank: int, head_out: int = 64) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(dim, dim).requires_grad_(False) for _ in range(blocks))
        self.lora_a = nn.ParameterList(nn.Parameter(torch.randn(dim, rank) * 0.01) for _ in range(blocks))
        self.lora_b = nn.ParameterList(nn.Parameter(torch.zeros(rank, dim)) for _ in range(blocks))
        self.head = nn.Linear(dim, head_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, a, b in zip(self.blocks, self.lora_a, self.lora_b):
            x = torch.relu(block(x) + (x @ a) @ b)
        return self.head(x)


def synthetic_model(frozen: int, trainable: int, dim: int = 1024) -> nn.Module:
    """A model with about ``frozen`` frozen and ``trainable`` trainable parameters."""
    blocks = max(1, round(frozen / (dim * dim + dim)))
    rank = max(1, round((trainable - dim * 64 - 64) / (2 * dim * blocks)))
    return SyntheticAdapted(dim, blocks, rank)


def count(model: nn.Module) -> tuple[int, int]:
    """(frozen, trainable) parameter counts."""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return frozen, trainable


def init_single_process() -> None:
    """One-rank gloo group when not started by a launcher; skips DeepSpeed's CPU shm op build."""
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.name.endswith(".py"))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def _s3_run_dir():
    """A loopback S3 server (rclone, as the tests start it); yields (run_dir URL, storage options)."""
    from mtlora_dist.storage.fs import StorageOptions

    from s3_server import KEY, SECRET, S3Server

    server = S3Server("rclone", Path(tempfile.mkdtemp(prefix="bench-s3-")) / "data").start()
    try:
        server.make_bucket("bench")
        os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        yield "s3://bench/run", StorageOptions(endpoint_url=server.endpoint, key=KEY, secret=SECRET)
    finally:
        server.stop()


def measure(model: nn.Module, workdir: str, stage: int = 2, s3: bool = False) -> dict[str, Any]:
    """Save ``model`` our way and DeepSpeed's under ``workdir``; sizes (bytes), save/load seconds, and
    with ``s3`` how long a save to a loopback S3 server holds the loop (the upload runs beside it)."""
    import deepspeed

    from mtlora_dist.checkpoint import Checkpointer, SavePolicy

    init_single_process()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[{"params": trainable_params}], config=config)
    ours_dir = os.path.join(workdir, "ours")
    ckpt = Checkpointer(ours_dir, engine, policy=SavePolicy(keep_last=1))
    # One optimizer step so Adam's moments are real. A zero loss built from the parameters themselves
    # needs no knowledge of the model's inputs.
    engine.backward(sum((p * 0).sum() for p in trainable_params))
    engine.step()
    url = ckpt.save(1)
    save_s = ckpt.blocked_s[-1]
    load_s = _timed(lambda: Checkpointer(ours_dir, engine, policy=SavePolicy(keep_last=1)).resume())
    result: dict[str, Any] = {"save_s": save_s, "load_s": load_s}
    if s3:
        with _s3_run_dir() as (run_dir, storage):
            remote = Checkpointer(run_dir, engine, policy=SavePolicy(keep_last=1), storage=storage)
            remote.save(1)  # the first save also aborts stale multipart uploads (one more request)
            remote.wait()
            remote.save(2)
            upload_s = _timed(remote.wait)
            result.update(
                s3_first_blocked_s=remote.blocked_s[0],
                s3_blocked_s=remote.blocked_s[1],
                s3_upload_after_s=upload_s,
                s3_load_s=_timed(lambda: Checkpointer(run_dir, engine, storage=storage).resume()),
            )
    default_dir = os.path.join(workdir, "default")
    engine.save_checkpoint(default_dir, tag="default")  # DeepSpeed as shipped, for the size comparison
    frozen, trainable = count(model)
    marker = json.loads(Path(url, "COMPLETE.json").read_text())
    expected = trainable * sum(BYTES_PER_TRAINABLE.values())
    ours = folder_bytes(url)  # every file, marker included
    return {
        "frozen_params": frozen,
        "trainable_params": trainable,
        "zero_stage": stage,
        "world_size": marker["world_size"],
        "ours_bytes": ours,
        "default_bytes": folder_bytes(default_dir),
        "expected_bytes": expected,
        "ours_vs_expected": ours / expected,
        **result,
    }


def _load_factory(spec: str) -> Callable[[], nn.Module]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def report_markdown(result: dict[str, Any], command: str, label: str) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, {platform.system()}"
    return "\n".join(
        [
            f"## {label}: {datetime.date.today().isoformat()}",
            "",
            f"- Command: `{command}`",
            f"- Machine: {machine}; torch {torch.__version__}, deepspeed {__import__('deepspeed').__version__}",
            f"- Model: {result['frozen_params']:,} frozen + {result['trainable_params']:,} trainable parameters; "
            f"ZeRO-{result['zero_stage']}, fp32, AdamW, {result['world_size']} rank(s)",
            "",
            "| checkpoint | size | bytes per trainable parameter |",
            "|---|---|---|",
            f"| ours: trainable state (fp32 masters, Adam moments, buffers), marker and state | "
            f"{_mib(result['ours_bytes'])} | "
            f"{result['ours_bytes'] / result['trainable_params']:.2f} |",
            f"| expected: trainable x (4 fp32 master + 8 Adam moments) | {_mib(result['expected_bytes'])} | 12.00 |",
            f"| DeepSpeed default `save_checkpoint` (frozen weights included) | {_mib(result['default_bytes'])} | "
            f"{result['default_bytes'] / result['trainable_params']:.2f} |",
            "",
            f"Ours is {result['ours_vs_expected']:.3f}x the expected size and "
            f"{result['default_bytes'] / result['ours_bytes']:.1f}x smaller than the default. "
            f"Save {result['save_s']:.2f} s, load {result['load_s']:.2f} s (local disk)."
            + (
                f" To S3 (loopback): the loop is held {result['s3_blocked_s']:.2f} s per save (the first one "
                f"{result['s3_first_blocked_s']:.2f} s), the upload takes "
                f"{result['s3_upload_after_s']:.2f} s more beside training; load {result['s3_load_s']:.2f} s."
                if "s3_blocked_s" in result
                else ""
            ),
            "",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frozen", type=int, default=28_000_000, help="synthetic model: frozen parameters")
    parser.add_argument("--trainable", type=int, default=1_500_000, help="synthetic model: trainable parameters")
    parser.add_argument("--model", default="", help="module:callable building the model instead")
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--s3", action="store_true", help="also time a save to a loopback S3 server")
    parser.add_argument("--label", default="", help="section title in the doc (default: the model)")
    parser.add_argument("--write-doc", default="", help="append the figures to this markdown file")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = _load_factory(args.model)() if args.model else synthetic_model(args.frozen, args.trainable)
    init_single_process()
    import torch.distributed as dist

    box = [tempfile.mkdtemp(prefix="ckpt-size-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)  # one folder for all ranks: a local run dir is shared
    workdir = box[0]
    try:
        result = measure(model, workdir, args.stage, args.s3)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.json and dist.get_rank() == 0:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.write_doc and dist.get_rank() == 0:
        launcher = f"deepspeed --num_accelerators {result['world_size']} " if result["world_size"] > 1 else "python "
        args_shown = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
        command = launcher + shlex.join([os.path.relpath(sys.argv[0]), *args_shown])
        label = args.label or (args.model or "synthetic model")
        doc = Path(args.write_doc)
        if not doc.exists():
            doc.write_text("# Checkpoint sizes\n\nWritten by `benchmarks/checkpoint_size.py`; newest last.\n\n")
        with doc.open("a") as f:
            f.write(report_markdown(result, command, label))
        print(f"appended to {doc}")


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # its status, never a process group's teardown abort
