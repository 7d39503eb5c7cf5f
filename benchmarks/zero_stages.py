"""Step time, peak memory, optimizer-state and parameter bytes per rank for ZeRO stages 0-3 on CPU ranks.

    python benchmarks/zero_stages.py [--config configs/pascal_swin_t_r64.yaml] [--size 224] [--batch 2]
        [--steps 5] [--stages 0 1 2 3] [--ranks 2] [--json out.json] [-- key=value ...]

    # full fine-tuning of Swin-B at ZeRO 1-3 on 2 and 4 ranks (docs/performance-model.md)
    python benchmarks/zero_stages.py --config configs/pascal_swin_b.yaml --size 64 --batch 1 --steps 1 \\
        --stages 1 2 3 --ranks 2 4 --json zero_swin_b.json -- method=full_ft

Each stage and world size runs in its own ``deepspeed --num_accelerators <ranks>`` job (gloo) with the real model and
``initialize_engine`` of the trainer, on random inputs and the real multi-task loss. Optimizer-state
bytes are the tensors this rank's optimizer holds (Adam moments and, under ZeRO, the fp32 master
partition), compared with the ZeRO ideal of 12 bytes x trainable / ranks (4 master + 8 Adam). Parameter
bytes are the module parameters this rank holds (under ZeRO-3 its partition, ``ds_tensor``), compared with
4 bytes x parameters / ranks. ``key=value`` arguments are config overrides (``method=full_ft``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import random_targets  # noqa: E402


def _tensor_bytes(obj) -> int:
    import torch

    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(engine) -> int:
    """Bytes of optimizer state held by this rank: Adam moments plus any separate fp32 master copy."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    total = _tensor_bytes(list(inner.state.values()))
    if inner is not opt:  # ZeRO keeps the fp32 master partition as the inner optimizer's parameters
        total += sum(p.numel() * p.element_size() for g in inner.param_groups for p in g["params"])
    return total


def watch_bucket_buffers(engine) -> list[int]:
    """A list that receives the bytes of ZeRO-1/2's gradient bucket buffers (``reduce_bucket_size``
    elements each, a second one with ``overlap_comm``) each time the backward allocates them. On a GPU
    the caching allocator holds them in full; on a CPU only the pages written are resident, so peak RSS
    understates them and the virtual peak shows them."""
    seen: list[int] = []
    optimizer = engine.optimizer
    setup = getattr(optimizer, "setup_buckets", None)
    if setup is None:  # ZeRO-0/3: no such buffers
        return seen

    def counted():
        setup()
        seen.append(sum(t.numel() * t.element_size() for b in optimizer.ipg_buckets.values() for t in b.buffer))

    optimizer.setup_buckets = counted
    return seen


def parameter_bytes(engine) -> int:
    """Bytes of module parameters this rank holds: under ZeRO-3 only its partition of each (``ds_tensor``;
    the full parameter is gathered for a forward and released), else every parameter in full."""
    total = 0
    for p in engine.module.parameters():
        held = getattr(p, "ds_tensor", None)
        held = p if held is None else held
        total += held.numel() * held.element_size()
    return total


def vm_peak_mib() -> float:
    """The process's peak virtual size (``VmPeak``): every allocation, touched or not."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith("VmPeak:"))
    return int(line.split()[1]) / 1024


def worker(args) -> None:
    import torch

    from mtlora_dist.config import load_config
    from mtlora_dist.data.config import BatchGeometry
    from mtlora_dist.engine.deepspeed_setup import initialize_engine, model_dtype
    from mtlora_dist.engine.distributed import init_distributed
    from mtlora_dist.models import build_model
    from mtlora_dist.tasks.losses import MultiTaskLoss

    info = init_distributed(args.local_rank)
    torch.set_num_threads(1)
    overrides = [
        f"model.img_size=[{args.size},{args.size}]",
        "model.pretrained=null",
        f"deepspeed.zero_stage={args.stage}",
    ]
    if args.size <= 64:  # the tiny windows the tests use at 64 px
        overrides.append("++model.backbone_kwargs.window_size=2")  # ++: Swin-B/L recipes name no backbone_kwargs
    cfg = load_config(args.config, [*overrides, *args.override])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = initialize_engine(
        model,
        cfg.optim,
        cfg.deepspeed,
        BatchGeometry(args.batch, cfg.deepspeed.gradient_accumulation_steps, info.world_size),
        1000,
    )
    loss_fn = MultiTaskLoss(cfg.data.tasks)
    images = torch.randn(args.batch, 3, args.size, args.size, dtype=model_dtype(cfg.deepspeed))
    targets = random_targets(cfg.data.tasks, args.batch, args.size)
    times, buffers = [], watch_bucket_buffers(engine)
    for step in range(args.steps + 1):
        start = time.perf_counter()
        total, _ = loss_fn({t: o.float() for t, o in engine(images).items()}, targets)
        engine.backward(total)
        engine.step()
        if step:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - start)
    result = {
        "stage": args.stage,
        "rank": info.rank,
        "world_size": info.world_size,
        "trainable": trainable,
        "step_s": statistics.median(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_vm_mib": vm_peak_mib(),
        "bucket_buffer_mib": max(buffers, default=0) / 2**20,
        "reduce_bucket_size": engine.zero_reduce_bucket_size() if engine.zero_optimization() else 0,
        "tag": args.tag,
        "optimizer_state_bytes": optimizer_state_bytes(engine),
        "parameter_bytes": parameter_bytes(engine),
        "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
        "method": str(cfg.method.name),
        "ideal_bytes": 12 * trainable / info.world_size,
        "optimizer": f"{type(engine.optimizer).__name__}/{type(getattr(engine.optimizer, 'optimizer', engine.optimizer)).__name__}",
    }
    with open(os.path.join(args.out, f"{args.tag}stage{args.stage}_rank{info.rank}.json"), "w") as fh:
        json.dump(result, fh)


def launch(
    stage: int, out: str, config: str, size: int, batch: int, steps: int, *extra: str, tag: str = "", ranks: int = 2
) -> None:
    """One ``deepspeed --num_accelerators <ranks>`` job of :func:`worker` (gloo); ``extra`` are config overrides."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(ranks),
           "--master_port", str(free_port()), os.path.abspath(__file__), "--worker", "--stage", str(stage),
           "--out", out, "--config", config, "--size", str(size), "--batch", str(batch), "--steps", str(steps),
           "--tag", tag, *(f"--override={o}" for o in extra)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pascal_swin_t_r64.yaml")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2], help="world sizes (one job per stage and size)")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. method=full_ft)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    out = tempfile.mkdtemp(prefix="zero-bench-")
    for ranks in args.ranks:
        for stage in args.stages:
            launch(stage, out, args.config, args.size, args.batch, args.steps, *args.overrides,
                   tag=f"w{ranks}_", ranks=ranks)  # fmt: skip
    rows = [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out))]
    rows.sort(key=lambda r: (r["world_size"], r["stage"], r["rank"]))
    print(f"method {rows[0]['method']}, {rows[0]['trainable']:,} trainable of {rows[0]['parameters']:,} parameters")
    print(
        "| ranks | ZeRO stage | rank | step (s) | peak RSS (MiB) | optimizer state (MiB) | 12 x trainable / ranks (MiB) "
        "| parameters held (MiB) | 4 x parameters / ranks (MiB) | optimizer |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['world_size']} | {r['stage']} | {r['rank']} | {r['step_s']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['optimizer_state_bytes'] / 2**20:.1f} | {r['ideal_bytes'] / 2**20:.1f} | "
            f"{r['parameter_bytes'] / 2**20:.1f} | {4 * r['parameters'] / r['world_size'] / 2**20:.1f} | {r['optimizer']} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # its status, never a process group's teardown abort
