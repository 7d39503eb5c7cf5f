"""Depth RMSE and log-RMSE over pixels with a depth (NYUD; spec Part B §6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtlora_dist.tasks.metrics.base import Metric

__all__ = ["DepthMetric"]


class DepthMetric(Metric):
    """``rmse`` = sqrt(mean (pred - gt)^2) and ``log_rmse`` = sqrt(mean (log gt - log pred)^2), metres,
    over all valid pixels of the dataset. Valid: label not the ignore value, not 0 and finite.
    Predictions are clamped to at least 1e-9 before the log, as the official meter does."""

    def _zero_state(self) -> dict[str, Tensor]:
        return {
            "sq": torch.zeros((), dtype=torch.float64),
            "log_sq": torch.zeros((), dtype=torch.float64),
            "count": torch.zeros((), dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred``: (B, 1, H, W), (B, H, W) or (H, W); ``target``: (B, H, W) or (H, W) metres."""
        target = target.to(pred.device).double()
        pred = pred.double().reshape(target.shape)
        valid = (target != self.ignore_index) & (target > 0) & torch.isfinite(target)
        p, t = pred[valid].clamp_min(1e-9), target[valid]
        self._add(
            sq=(p - t).square().sum(),
            log_sq=(t.log() - p.log()).square().sum(),
            count=valid.sum(),
        )

    def compute(self) -> dict[str, float]:
        n = int(self.state["count"])
        if n == 0:
            return {"rmse": float("nan"), "log_rmse": float("nan")}
        return {"rmse": math.sqrt(float(self.state["sq"]) / n), "log_rmse": math.sqrt(float(self.state["log_sq"]) / n)}
