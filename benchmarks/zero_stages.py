"""Step time, peak memory and optimizer-state bytes per rank for ZeRO stages 0-3 on 2 CPU ranks.

    python benchmarks/zero_stages.py [--config configs/pascal_swin_t_r64.yaml] [--size 224] [--batch 2]
        [--steps 5] [--stages 0 1 2 3] [--json out.json]

Each stage runs in its own ``deepspeed --num_accelerators 2`` job (gloo) with the real model and
``initialize_engine`` of the trainer, on random inputs and the real multi-task loss. Optimizer-state
bytes are the tensors this rank's optimizer holds (Adam moments and, under ZeRO, the fp32 master
partition), compared with the ZeRO ideal of 12 bytes x trainable / ranks (4 master + 8 Adam).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def worker(args) -> None:
    import torch

    from mtlora_dist.config import load_config
    from mtlora_dist.engine.deepspeed_setup import initialize_engine
    from mtlora_dist.engine.distributed import init_distributed
    from mtlora_dist.models import build_model
    from mtlora_dist.tasks.losses import MultiTaskLoss

    info = init_distributed(args.local_rank)
    torch.set_num_threads(1)
    cfg = load_config(
        args.config,
        [f"model.img_size=[{args.size},{args.size}]", "model.pretrained=null", f"deepspeed.zero_stage={args.stage}"],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = initialize_engine(model, cfg.optim, cfg.deepspeed, args.batch, info.world_size, 1000)
    loss_fn = MultiTaskLoss(cfg.data.tasks)
    images = torch.randn(args.batch, 3, args.size, args.size)
    targets = random_targets(cfg.data.tasks, args.batch, args.size)
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        total, _ = loss_fn(engine(images), targets)
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
        "optimizer_state_bytes": optimizer_state_bytes(engine),
        "ideal_bytes": 12 * trainable / info.world_size,
        "optimizer": f"{type(engine.optimizer).__name__}/{type(getattr(engine.optimizer, 'optimizer', engine.optimizer)).__name__}",
    }
    with open(os.path.join(args.out, f"stage{args.stage}_rank{info.rank}.json"), "w") as fh:
        json.dump(result, fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pascal_swin_t_r64.yaml")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    out = tempfile.mkdtemp(prefix="zero-bench-")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for stage in args.stages:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_accelerators",
            "2",
            "--master_port",
            str(29700 + stage),
            os.path.abspath(__file__),
            "--worker",
            "--stage",
            str(stage),
            "--out",
            out,
            "--config",
            args.config,
            "--size",
            str(args.size),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
        ]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out))]
    print(
        "| ZeRO stage | rank | step (s) | peak RSS (MiB) | optimizer state (MiB) | 12 x trainable / ranks (MiB) | optimizer |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['rank']} | {r['step_s']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['optimizer_state_bytes'] / 2**20:.1f} | {r['ideal_bytes'] / 2**20:.1f} | {r['optimizer']} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
