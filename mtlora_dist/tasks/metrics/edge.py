"""Edge loss and a pixel-exact F-measure over fixed thresholds (not the SEISM benchmark)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlora_dist.tasks.losses import balanced_bce_terms
from mtlora_dist.tasks.metrics.base import Metric
from mtlora_dist.tasks.metrics.thresholds import above_threshold, level_histograms
from mtlora_dist.tasks.registry import IGNORE_INDEX, TaskSpec

__all__ = ["EdgeMetric"]


class EdgeMetric(Metric):
    """Balanced-BCE loss per valid pixel and ``odsF``: the best F over thresholds of dataset-level counts.

    For each of ``num_thresholds`` thresholds evenly spaced in (0, 1) (default 99: 0.01 ... 0.99),
    TP/FP/FN of ``sigmoid(logit) > t`` against the binary edge map are summed over the whole dataset,
    then ``F = 2PR / (P + R)`` and ``odsF`` = max over thresholds (percent); ``ods_threshold`` is where
    it peaks. Matching is pixel-exact (tolerance 0) with no thinning, so this is *not* the SEISM /
    BSDS benchmark the literature reports (which matches within a distance tolerance); use it to
    compare runs of this code. ``loss`` is the training loss (fixed positive weight), averaged over
    all valid pixels of the dataset, where the official meter averaged per-batch means fed with
    probabilities instead of logits (B12).
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, pos_weight: float = 0.95, num_thresholds: int = 99) -> None:
        self.pos_weight = pos_weight
        self.thresholds = torch.linspace(0.0, 1.0, num_thresholds + 2, dtype=torch.float64)[1:-1]  # compared in float32
        super().__init__(ignore_index)

    @classmethod
    def from_spec(cls, spec: TaskSpec, dataset: str) -> EdgeMetric:
        return cls(ignore_index=spec.ignore_index, **spec.loss_kwargs)  # same pos_weight as the loss

    def _zero_state(self) -> dict[str, Tensor]:
        levels = self.thresholds.numel() + 1
        return {
            "loss_sum": torch.zeros((), dtype=torch.float64),
            "pixels": torch.zeros((), dtype=torch.int64),
            "positive_levels": torch.zeros(levels, dtype=torch.int64),
            "negative_levels": torch.zeros(levels, dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred``: logits (B, 1, H, W) or (1, H, W); ``target``: (B, H, W) or (H, W), 0/1/ignore."""
        target = target.reshape(-1, *target.shape[-2:]).to(pred.device)  # (B, H, W)
        pred = pred.reshape(target.shape[0], 1, *pred.shape[-2:])  # (B, 1, H, W)
        terms, valid = balanced_bce_terms(pred, target, self.pos_weight, self.ignore_index)
        prob = torch.sigmoid(pred.float()).reshape(1, -1)  # (1, N): one group, the counts are dataset-level
        positive = (target >= 0.5).reshape(1, -1)
        pos_hist, neg_hist = level_histograms(prob, positive, valid.reshape(1, -1), self.thresholds)
        self._add(
            loss_sum=terms[valid].double().sum(),
            pixels=valid.sum(),
            positive_levels=pos_hist[0],
            negative_levels=neg_hist[0],
        )

    def compute(self) -> dict[str, float]:
        pixels = int(self.state["pixels"])
        tp = above_threshold(self.state["positive_levels"]).double()  # (J,)
        fp = above_threshold(self.state["negative_levels"]).double()
        fn = self.state["positive_levels"].sum().double() - tp
        precision = tp / (tp + fp).clamp_min(1)
        recall = tp / (tp + fn).clamp_min(1)
        f = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        best = int(f.argmax())
        return {
            "loss": float(self.state["loss_sum"]) / pixels if pixels else float("nan"),
            "odsF": 100.0 * float(f[best]) if pixels else float("nan"),
            "ods_threshold": float(self.thresholds[best]) if pixels else float("nan"),
        }
