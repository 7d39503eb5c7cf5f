"""Issue 33 item 11: an imported official checkpoint continued at another batch size trains at the recipe's
learning rate for the new global batch, not at the rates computed for the import's batch size (a resume
takes only the schedule's position from a checkpoint, never its learning rates)."""

from __future__ import annotations

import json

import pytest
import torch
from runs import QUICKSTART
from test_import_official import OVERRIDES, official_config, our_model, run_cli, write_official, yacs_module

from mtlora_dist.config import load_config
from mtlora_dist.data.ingest.convert import convert
from mtlora_dist.engine.optim import build_optimizer
from mtlora_dist.synthetic.datasets import generate

__all__ = ["yacs_module"]  # the fixture, used by name

RECIPE = [*OVERRIDES, "optim.lr_scaling=linear", "optim.warmup_fraction=0.5"]


def recipe_lrs(global_batch: int, steps: int, steps_per_epoch: int) -> list[float]:
    """The lr after each of ``steps`` optimizer steps, as the recipe schedules it for ``global_batch``."""
    cfg = load_config(QUICKSTART, RECIPE)
    optimizer, schedule = build_optimizer(torch.nn.Linear(2, 2), cfg.optim, global_batch, steps, steps_per_epoch)
    lrs = []
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    return lrs


@pytest.mark.integration
def test_an_import_continued_at_another_batch_size_trains_at_the_recipes_lr(yacs_module, tmp_path):
    generate("pascal_context", str(tmp_path / "raw"), num_train=8, num_val=4, seed=7)
    for split in ("train", "val"):
        convert("pascal_context", str(tmp_path / "raw"), split, str(tmp_path / split), shard_size_mb=0.2)
    official = write_official(tmp_path / "ckpt_epoch_299.pth", our_model(), official_config(yacs_module))
    run_dir = tmp_path / "run"
    data = [f"data.train_url={tmp_path / 'train'}", f"data.val_url={tmp_path / 'val'}", "data.batch_size=2"]
    proc = run_cli(
        "import_official.py", ["--config", QUICKSTART, *RECIPE, *data, f"official={official}", f"run_dir={run_dir}"],
        tmp_path, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    # the import's engine ran at global batch 2; continue at 4 (8 samples: 2 steps an epoch)
    more = ["data.batch_size=4", "max_steps=2", "eval.max_batches=1", "eval.visual_samples=0"]
    proc = run_cli("train.py", ["--config", str(run_dir / "config.yaml"), *more], tmp_path, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from step 0" in out
    said = [line for line in out.splitlines() if "learning rates recomputed" in line]
    assert len(said) == 1, out[-4000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    logged = [r["lr"] for r in rows if r.get("split") == "train"]
    want, import_lrs = recipe_lrs(4, 2, 2), recipe_lrs(2, 2, 2)
    assert logged == pytest.approx(want, rel=1e-9)
    assert all(abs(a - b) > 0.4 * b for a, b in zip(logged, import_lrs, strict=True))  # not the import's 2/512
