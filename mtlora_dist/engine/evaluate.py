"""Distributed evaluation: every rank evaluates its share, the metric state is summed across ranks."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlora_dist.data.batch import normalize_image
from mtlora_dist.tasks.evaluation import MultiTaskEvaluator

__all__ = ["evaluate", "to_device"]


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Move a batch to the device; the uint8 image becomes a normalised float tensor there (cheaper
    than shipping floats out of DataLoader workers)."""
    out = {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    out["image"] = normalize_image(out["image"], dtype)
    return out


@torch.no_grad()
def evaluate(engine, loader, evaluator: MultiTaskEvaluator, device: torch.device, dtype: torch.dtype,
             max_batches: int = 0) -> dict:
    """Run ``loader`` through the model in eval mode and return the evaluator's (all-reduced) results."""
    module = engine.module if hasattr(engine, "module") else engine
    was_training = module.training
    module.eval()
    evaluator.reset()
    if hasattr(loader, "rewind"):
        loader.rewind()  # every evaluation sees the same batches, also with max_batches
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = to_device(batch, device, dtype)
        preds = {t: p.float() for t, p in engine(batch["image"]).items()}
        if "valid" in batch:  # padding samples that keep ranks in step must not be counted
            keep = batch["valid"].bool()
            preds = {t: p[keep] for t, p in preds.items()}
            batch = {k: (v[keep] if isinstance(v, Tensor) and v.shape[:1] == keep.shape else v)
                     for k, v in batch.items()}
            if not keep.any():
                continue
        evaluator.update(preds, batch)
    results = evaluator.compute()
    module.train(was_training)
    return results
