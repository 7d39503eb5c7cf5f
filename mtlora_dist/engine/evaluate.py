"""Distributed evaluation: every rank evaluates its share, the metric state is summed across ranks.

:class:`Validation` is the one component the training loop calls at an evaluation step: rank 0's
buffers to every rank, the metrics, their log lines, then whatever reports the entry point plugged in
(prediction grids and curves live in ``reports/``, above the engine, and reach the loop as a
:class:`TrainingReports`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from mtlora_dist import comm
from mtlora_dist.data.stream.batch import normalize_image
from mtlora_dist.engine.run_logger import RunLogger
from mtlora_dist.tasks.evaluation import MultiTaskEvaluator

__all__ = ["evaluate", "to_device", "Validation", "TrainingReports", "ReportsFactory"]


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Move a batch to the device; the uint8 image becomes a normalised float tensor there (cheaper
    than shipping floats out of DataLoader workers)."""
    out = {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    out["image"] = normalize_image(out["image"], dtype)
    return out


@torch.no_grad()
def evaluate(
    engine, loader, evaluator: MultiTaskEvaluator, device: torch.device, dtype: torch.dtype, max_batches: int = 0
) -> dict:
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
            batch = {
                k: (v[keep] if isinstance(v, Tensor) and v.shape[:1] == keep.shape else v) for k, v in batch.items()
            }
            if not keep.any():
                continue
        evaluator.update(preds, batch)
    results = evaluator.compute()
    module.train(was_training)
    return results


class TrainingReports(Protocol):
    """What a training run shows people besides its metrics (``reports.TrainingReporter``)."""

    def after_evaluation(self, model, step: int, logger: RunLogger, device: torch.device, dtype: torch.dtype) -> None:
        """Called on every rank after each evaluation (a forward may be a collective under ZeRO-3)."""

    def at_end(self, logger: RunLogger, step: int) -> None:
        """Called on every rank once the loop is done."""


ReportsFactory = Callable[..., "TrainingReports | None"]  # (cfg, val_url) -> reports, or None for none


class Validation:
    """Evaluation at ``every`` steps and at the last one; call :meth:`run` on every rank."""

    def __init__(
        self,
        loader,
        evaluator: MultiTaskEvaluator,
        logger: RunLogger,
        *,
        every: int,
        max_batches: int,
        device: torch.device,
        dtype: torch.dtype,
        reports: TrainingReports | None = None,
    ) -> None:
        self.loader, self.evaluator, self.logger = loader, evaluator, logger
        self.every, self.max_batches = every, max_batches
        self.device, self.dtype = device, dtype
        self.reports = reports

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every and step % self.every == 0) or step == total_steps

    def run(self, engine, step: int) -> dict:
        comm.broadcast_buffers(engine.module)  # BatchNorm statistics drift apart per rank without SyncBN
        results = evaluate(engine, self.loader, self.evaluator, self.device, self.dtype, self.max_batches)
        if self.logger.enabled:
            tasks = {t: results[t] for t in self.evaluator.tasks}
            self.logger.log(
                {"step": step, "split": "val", "tasks": tasks, "delta_m": results.get("delta_m")},
                console=f"evaluation at step {step}\n{self.evaluator.table(results)}",
            )
            self.logger.flush()
        if self.reports is not None:
            self.reports.after_evaluation(engine, step, self.logger, self.device, self.dtype)
        return results

    def finish(self, step: int) -> None:
        if self.reports is not None:
            self.reports.at_end(self.logger, step)
