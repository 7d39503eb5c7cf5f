"""Trains the tiny model under ZeRO-3 on partially labelled shards and reports every micro-batch's losses.

Started by ``tests/engine/test_partial_labels.py`` twice on the same samples: with the ``deepspeed``
launcher as 2 ranks (rank r reads its own share), and as one process with gradient accumulation 2 whose
micro-batch r of each step is rank r's batch of the 2-rank run (a loader per rank of a world of 2). The
gradients of the two runs are the same average, so every loss must agree. Rank 0 writes
``{"losses": {step: {micro: {task: loss}}}}`` to ``--out``; the 2-rank run adds rank 1's losses through
an all-gather (ZeRO-3 would hang there if a rank had skipped a head).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mtlora_dist import comm  # noqa: E402
from mtlora_dist.config import load_config  # noqa: E402
from mtlora_dist.data.config import BatchGeometry, DataWorld  # noqa: E402
from mtlora_dist.engine.data_setup import batch_geometry, make_loader  # noqa: E402
from mtlora_dist.engine.deepspeed_setup import initialize_engine  # noqa: E402
from mtlora_dist.engine.distributed import init_distributed  # noqa: E402
from mtlora_dist.engine.evaluate import to_device  # noqa: E402
from mtlora_dist.models import build_model  # noqa: E402
from mtlora_dist.tasks.losses import MultiTaskLoss  # noqa: E402

SHARE_WORLD = 2  # the data is always split as for 2 ranks


def _loader(cfg, url: str, rank: int):
    world = DataWorld(rank=rank, world_size=SHARE_WORLD, num_workers=0)  # each share read as one of 2 ranks
    return make_loader(cfg, url, "train", world, BatchGeometry(cfg.data.batch_size, 1, SHARE_WORLD))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--local_rank", type=int, default=None)
    args, overrides = parser.parse_known_args()

    info = init_distributed(args.local_rank)
    accumulation = SHARE_WORLD // info.world_size
    cfg = load_config(args.config, [*overrides, f"deepspeed.gradient_accumulation_steps={accumulation}"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    engine = initialize_engine(model, cfg.optim, cfg.deepspeed, batch_geometry(cfg, info.world_size), args.steps)
    loss_fn = MultiTaskLoss(list(cfg.data.tasks))
    shares = [info.rank] if info.world_size == SHARE_WORLD else list(range(SHARE_WORLD))
    batches = {r: iter(_loader(cfg, cfg.data.train_url, r)) for r in shares}

    report: dict[int, dict[int, dict[str, float]]] = {}
    for step in range(1, args.steps + 1):
        report[step] = {}
        for share in shares:  # one micro-batch per share: 1 on each of 2 ranks, or 2 on one rank
            batch = to_device(next(batches[share]), info.device, torch.float32)
            outputs = engine(batch["image"])
            total, per_task = loss_fn({t: o.float() for t, o in outputs.items()}, batch)
            engine.backward(total)
            engine.step()
            losses = {"loss": total.item(), **{t: v.item() for t, v in per_task.items()}}
            losses["labeled/" + "+".join(cfg.data.tasks)] = [int(batch[f"labeled/{t}"].sum()) for t in cfg.data.tasks]
            report[step][share] = losses
    if info.world_size > 1:
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, report)
        report = {s: {r: gathered[r][s][r] for r in range(info.world_size)} for s in report}
    if info.rank == 0:
        Path(args.out).write_text(json.dumps({"losses": report}))
    comm.shutdown()


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # its status, never a process group's teardown abort
