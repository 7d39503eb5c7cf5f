"""Export a training checkpoint: restore the trained model, fold it, check it against the unfolded one, save.

Needs the training engine (checkpoint reading verifies DeepSpeed's files), unlike loading an export.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from typing import Any

import torch

from mtlora_dist.config import TrainConfig
from mtlora_dist.engine.deepspeed_setup import model_dtype
from mtlora_dist.engine.restore import resolve_checkpoint, restore_model
from mtlora_dist.export.artifact import MANIFEST, WEIGHTS, ModelSpec, save
from mtlora_dist.export.merge import output_difference, to_inference
from mtlora_dist.storage.fs import is_remote, join, url_to_fs

__all__ = ["export_checkpoint"]

log = logging.getLogger("mtlora_dist")

CHECK_BATCH = 2


def export_checkpoint(
    cfg: TrainConfig, checkpoint: str, out_dir: str, *, fold_task_proj: bool = False, tolerance: float = 1e-4
) -> dict[str, Any]:
    """Write the inference form of ``checkpoint`` (run directory or ``checkpoints/step_X``) to ``out_dir``
    (local or ``s3://``); returns what ``export.json`` records. Raises if the folded model's outputs differ
    from the trained model's by more than ``tolerance`` (relative to the output scale)."""
    storage = cfg.data.storage
    ref = resolve_checkpoint(checkpoint, storage)
    trained = restore_model(cfg, ref, storage, dtype=model_dtype(cfg.deepspeed)).float()
    folded = copy.deepcopy(trained)
    summary = to_inference(folded, fold_task_proj=fold_task_proj)

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(CHECK_BATCH, 3, *cfg.model.img_size, generator=generator)
    difference = output_difference(trained, folded, images)
    worst = max(difference.values())
    if worst > tolerance:
        raise RuntimeError(
            f"the folded model's outputs differ from the trained model's by {worst:.2e} (relative; "
            f"per task {difference}), above the tolerance {tolerance:.0e}: nothing was written"
        )
    extra = {
        "source": {"checkpoint": ref.url, "step": ref.step, "run_dir": ref.run_dir},
        "check": {
            "images": f"{CHECK_BATCH} x N(0, 1) at {list(cfg.model.img_size)}",
            "max_relative_difference": difference,
            "tolerance": tolerance,
        },
    }
    spec = ModelSpec(cfg.model, cfg.adapter, cfg.trainable, list(cfg.data.tasks), cfg.data.dataset)
    _save_to(out_dir, lambda local: save(folded, spec, summary, local, extra), cfg)
    log.info(
        "exported %s (step %d) to %s: %d TA-LoRA layers merged, %d task proj layers folded, %d BatchNorms "
        "folded, %d layers keep task branches; max relative output difference %.1e",
        ref.url,
        ref.step,
        out_dir,
        summary.ta_lora_merged,
        summary.task_proj_folded,
        summary.batchnorm_folded,
        len(summary.adapters_left),
        worst,
    )
    return {"summary": summary, **extra}


def _save_to(out_dir: str, write, cfg: TrainConfig) -> None:
    """Local folders are written in place; remote ones are written locally and uploaded, manifest last."""
    if not is_remote(out_dir):
        write(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="mtlora-export-") as tmp:
        write(tmp)
        for name in (WEIGHTS, MANIFEST):
            fs, path = url_to_fs(join(out_dir, name), cfg.data.storage)
            fs.put_file(os.path.join(tmp, name), path)
