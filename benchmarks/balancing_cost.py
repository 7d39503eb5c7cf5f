"""CPU time of one training step under each ``loss.balancing`` method, relative to ``fixed``.

    python benchmarks/balancing_cost.py [--steps 4] [--rounds 2] [--size 64]

One process, one rank, DeepSpeed ZeRO-2 on the CPU, the quickstart's tiny model: one engine, then each
method's loss in turn (rounds interleave the methods so drift hits all alike). Process CPU time per
``trainer._train_step`` (less sensitive to other load on the machine than wall time), median over steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from mtlora_dist import comm  # noqa: E402
from mtlora_dist.config import load_config  # noqa: E402
from mtlora_dist.engine import trainer  # noqa: E402
from mtlora_dist.engine.deepspeed_setup import initialize_engine, model_dtype  # noqa: E402
from mtlora_dist.engine.distributed import init_distributed  # noqa: E402

METHODS = ["fixed", "uncertainty", "dwa", "upgrad", "mgda"]


def _batches(tasks: list[str], size: int, batch: int):
    g = torch.Generator().manual_seed(0)
    while True:
        out = {"image": torch.randn(batch, 3, size, size, generator=g)}
        for task in tasks:
            out[task] = torch.randint(0, 2, (batch, size, size), generator=g, dtype=torch.uint8)
        if "normals" in tasks:
            out["normals"] = torch.nn.functional.normalize(torch.randn(batch, 3, size, size, generator=g), dim=1)
        yield out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    torch.set_num_threads(1)
    base = [f"model.img_size=[{args.size},{args.size}]", "model.backbone_kwargs.window_size=2", "deepspeed=zero2"]
    cfg = load_config(None, base)
    info = init_distributed(timeout_s=cfg.deepspeed.process_group_timeout_s)
    torch.manual_seed(cfg.seed)
    model = trainer._build_model(cfg, info)
    total = 1 + args.rounds * len(METHODS) * (args.steps + 1)
    engine = initialize_engine(model, cfg.optim, cfg.deepspeed, args.batch, info.world_size, total)
    batches, dtype = _batches(list(cfg.data.tasks), args.size, args.batch), model_dtype(cfg.deepspeed)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for method in METHODS:
            loss_fn = trainer._build_loss(load_config(None, [*base, f"loss.balancing={method}"]), engine, 10, info)
            trainer._train_step(engine, batches, loss_fn, info, dtype, 1)  # warm-up
            for _ in range(args.steps):
                start = time.process_time()
                trainer._train_step(engine, batches, loss_fn, info, dtype, 1)
                times[method].append(time.process_time() - start)
            getattr(loss_fn.balancer, "close", lambda: None)()
    fixed = statistics.median(times["fixed"])
    rows = {
        m: {"cpu_s_per_step": statistics.median(t), "vs_fixed": statistics.median(t) / fixed} for m, t in times.items()
    }
    for method, row in rows.items():
        print(f"{method:12s} {row['cpu_s_per_step']:.3f} CPU s/step  x{row['vs_fixed']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    comm.shutdown()


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # its status, never a process group's teardown abort
