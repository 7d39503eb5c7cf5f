"""Host reads around real DeepSpeed steps (one rank, CPU): ``trainer._train_step`` on the tiny quickstart
model after ``initialize_engine`` with a config from ``configs/deepspeed/``; started by
``tests/engine/test_train_step.py``.

    python host_sync_worker.py --deepspeed zero2 --out reads.json [overrides...]

Writes ``{"steps": N, "counts": {"<method> <file:function>": calls over N steps}, "log": [...]}``: the
steps after a first one (which allocates the optimizer state), then one ``_host_values`` log read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from host_reads import count_host_reads  # noqa: E402
from torch import nn  # noqa: E402

from mtlora_dist import comm  # noqa: E402
from mtlora_dist.config import load_config  # noqa: E402
from mtlora_dist.data.config import BatchGeometry
from mtlora_dist.engine import trainer  # noqa: E402
from mtlora_dist.engine.deepspeed_setup import initialize_engine, model_dtype  # noqa: E402
from mtlora_dist.engine.distributed import init_distributed  # noqa: E402
from mtlora_dist.tasks.losses import MultiTaskLoss  # noqa: E402

SIZE, BATCH = 64, 2


def _batches(tasks: list[str]):
    g = torch.Generator().manual_seed(0)
    while True:  # as the loader yields them: fp32 images, uint8 labels, on the host
        batch = {"image": torch.randn(BATCH, 3, SIZE, SIZE, generator=g)}
        for task in tasks:
            batch[task] = torch.randint(0, 2, (BATCH, SIZE, SIZE), generator=g, dtype=torch.uint8)
        if "normals" in tasks:
            batch["normals"] = nn.functional.normalize(torch.randn(BATCH, 3, SIZE, SIZE, generator=g), dim=1)
        yield batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accumulation", type=int, default=2)
    args, overrides = parser.parse_known_args()

    cfg = load_config(None, [f"model.img_size=[{SIZE},{SIZE}]", "model.backbone_kwargs.window_size=2",
                             f"deepspeed={args.deepspeed}",
                             f"deepspeed.gradient_accumulation_steps={args.accumulation}", *overrides])  # fmt: skip
    info = init_distributed(timeout_s=cfg.deepspeed.process_group_timeout_s)
    torch.manual_seed(cfg.seed)
    model = trainer._build_model(cfg, info)
    engine = initialize_engine(
        model,
        cfg.optim,
        cfg.deepspeed,
        BatchGeometry(BATCH, cfg.deepspeed.gradient_accumulation_steps, info.world_size),
        args.steps + 1,
    )
    loss_fn, batches, dtype = MultiTaskLoss(list(cfg.data.tasks)), _batches(cfg.data.tasks), model_dtype(cfg.deepspeed)
    trainer._train_step(engine, batches, loss_fn, info, dtype, args.accumulation)  # allocates the optimizer state
    with count_host_reads() as counts:
        for _ in range(args.steps):
            losses = trainer._train_step(engine, batches, loss_fn, info, dtype, args.accumulation)
    with count_host_reads() as log_counts:
        values = trainer._host_values(losses)
    report = {"steps": args.steps, "counts": dict(counts), "log": dict(log_counts), "values": values,
              "global_steps": engine.global_steps, "optimizer": type(engine.optimizer).__name__}  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=1))
    comm.shutdown()


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # its status, never a process group's teardown abort
