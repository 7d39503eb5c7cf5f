"""One rank of a 2-rank bf16 ZeRO-2 job on the tiny quickstart model, built as the trainer builds it
(``trainer._build_model``: SyncBN conversion when ``model.sync_bn`` and 2+ ranks); started by
``tests/engine/test_sync_bn_ranks.py`` with the ``deepspeed`` launcher (gloo).

Each rank trains a few steps on its own random batch (the same each step), then evaluates; rank 0 writes what the test checks
to ``--out``: BatchNorm kinds and statistics of both ranks, every buffer's dtype, losses, evaluation
outputs' dtype, state_dict keys with and without the conversion, and the DeepSpeed JSON it ran with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mtlora_dist import comm  # noqa: E402
from mtlora_dist.config import load_config  # noqa: E402
from mtlora_dist.data.config import BatchGeometry
from mtlora_dist.engine import trainer  # noqa: E402
from mtlora_dist.engine.deepspeed_setup import initialize_engine, model_dtype  # noqa: E402
from mtlora_dist.engine.distributed import init_distributed  # noqa: E402
from mtlora_dist.models import build_model  # noqa: E402
from mtlora_dist.tasks.losses import MultiTaskLoss  # noqa: E402

SIZE, BATCH = 64, 2


def _batch(tasks: list[str], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(dtype)}
    for task in tasks:
        batch[task] = torch.randint(0, 2, (BATCH, SIZE, SIZE), generator=g, dtype=torch.uint8)
    if "normals" in tasks:
        batch["normals"] = nn.functional.normalize(torch.randn(BATCH, 3, SIZE, SIZE, generator=g), dim=1)
    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--local_rank", type=int, default=None)
    args, overrides = parser.parse_known_args()

    info = init_distributed(args.local_rank)
    cfg = load_config(None, [f"model.img_size=[{SIZE},{SIZE}]", "model.backbone_kwargs.window_size=2", *overrides])
    dtype = model_dtype(cfg.deepspeed)
    torch.manual_seed(cfg.seed)
    plain_keys = list(build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset).state_dict())
    torch.manual_seed(cfg.seed)
    model = trainer._build_model(cfg, info)
    engine = initialize_engine(
        model,
        cfg.optim,
        cfg.deepspeed,
        BatchGeometry(BATCH, cfg.deepspeed.gradient_accumulation_steps, info.world_size),
        args.steps,
    )
    loss_fn = MultiTaskLoss(list(cfg.data.tasks))

    losses = []
    for _ in range(args.steps):
        batch = _batch(cfg.data.tasks, 1000 * info.rank, dtype)  # each rank its own samples, every step
        outputs = engine(batch["image"])
        total, _ = loss_fn({t: o.float() for t, o in outputs.items()}, batch)
        engine.backward(total)
        engine.step()
        losses.append(total.item())
    engine.eval()
    with torch.no_grad():
        evaluated = engine(_batch(cfg.data.tasks, 99, dtype)["image"])

    norms = {n: m for n, m in engine.module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    stats = {n: [m.running_mean.tolist(), m.running_var.tolist(), int(m.num_batches_tracked)] for n, m in norms.items()}
    report = {
        "world_size": info.world_size,
        "norm_types": sorted({type(m).__name__ for m in norms.values()}),
        "stats": comm.all_gather_object(stats),
        "buffers": {n: str(b.dtype) for n, b in engine.module.named_buffers()},
        "losses": losses,
        "eval": {t: [str(o.dtype), bool(torch.isfinite(o.float()).all())] for t, o in evaluated.items()},
        "keys": [list(engine.module.state_dict()), plain_keys],
        "ds_config": {"zero": engine.config["zero_optimization"], "comm": engine.communication_data_type.__repr__()},
    }
    if info.rank == 0:
        Path(args.out).write_text(json.dumps(report))
    comm.shutdown()


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # its status, never a process group's teardown abort
