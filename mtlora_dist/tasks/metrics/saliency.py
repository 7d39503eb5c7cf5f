"""Saliency maxF and mIoU over fixed thresholds, averaged per image (spec Part B §6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlora_dist.tasks.metrics.base import Metric
from mtlora_dist.tasks.metrics.thresholds import above_threshold, level_histograms
from mtlora_dist.tasks.registry import IGNORE_INDEX

__all__ = ["SaliencyMetric"]

SALIENCY_THRESHOLDS = tuple(torch.linspace(0.2, 0.9, 15, dtype=torch.float64).tolist())  # 0.2, 0.25, ..., 0.9


class SaliencyMetric(Metric):
    """Per image and threshold: IoU, precision and recall of ``sigmoid(logit) > t`` on valid pixels.

    IoU of an image with empty ground truth and empty prediction is 1; precision and recall of an
    empty denominator are 0 (as the official ``jaccard.py``). Each is averaged over images;
    ``mIoU`` = max over thresholds of the mean IoU; ``maxF`` = max over thresholds of
    ``2PR / (P + R)`` from the image-averaged P and R (beta = 1). Both in percent. The sigmoid is applied
    once, to the logits (the official "Beta maxF" applied it twice, B12). Images with no valid pixel
    are not counted.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, thresholds: Sequence[float] = SALIENCY_THRESHOLDS) -> None:
        self.thresholds = torch.tensor(sorted(thresholds), dtype=torch.float64)  # compared in float32
        super().__init__(ignore_index)

    def _zero_state(self) -> dict[str, Tensor]:
        per_threshold = torch.zeros(self.thresholds.numel(), dtype=torch.float64)
        return {
            "iou": per_threshold.clone(),
            "precision": per_threshold.clone(),
            "recall": per_threshold.clone(),
            "images": torch.zeros((), dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred``: logits (B, 1, H, W), (B, H, W) or (H, W); ``target``: (B, H, W) or (H, W), 0/1/ignore."""
        target = target.reshape(-1, *target.shape[-2:]).to(pred.device)  # (B, H, W)
        batch = target.shape[0]
        prob = torch.sigmoid(pred.float()).reshape(batch, -1)  # (B, N)
        target = target.reshape(batch, -1)
        if prob.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}")
        valid = target != self.ignore_index
        pos_hist, neg_hist = level_histograms(prob, target >= 0.5, valid, self.thresholds)
        tp = above_threshold(pos_hist).double()  # (B, J)
        fp = above_threshold(neg_hist).double()
        fn = pos_hist.sum(-1, keepdim=True).double() - tp
        union = tp + fp + fn
        iou = torch.where(union > 0, tp / union.clamp_min(1), 1.0)
        precision = tp / (tp + fp).clamp_min(1)
        recall = tp / (tp + fn).clamp_min(1)
        scored = valid.any(dim=1).unsqueeze(1)  # (B, 1): images with at least one labelled pixel
        self._add(
            iou=(iou * scored).sum(0),
            precision=(precision * scored).sum(0),
            recall=(recall * scored).sum(0),
            images=scored.sum(),
        )

    def compute(self) -> dict[str, float]:
        n = int(self.state["images"])
        if n == 0:
            return {"maxF": float("nan"), "mIoU": float("nan")}
        p, r = self.state["precision"] / n, self.state["recall"] / n
        f = 2 * p * r / (p + r).clamp_min(1e-12)
        return {"maxF": 100.0 * float(f.max()), "mIoU": 100.0 * float((self.state["iou"] / n).max())}
