"""mIoU from one dataset-level confusion matrix (semseg, human_parts; spec Part B §6)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtlora_dist.tasks.metrics.base import Metric
from mtlora_dist.tasks.registry import IGNORE_INDEX, TaskSpec

__all__ = ["SegmentationMetric"]

AbsentClasses = Literal["exclude", "zero"]


class SegmentationMetric(Metric):
    """Confusion matrix over valid pixels; mIoU is the mean of per-class IoU = TP / (TP + FP + FN).

    A class absent from both prediction and ground truth over everything seen has no IoU:
    ``absent="exclude"`` (default) leaves it out of the mean, ``absent="zero"`` counts it as 0 as the
    official meters do (``max(union, 1e-8)``). On the full PASCAL-Context val set every class occurs and
    both agree; they differ on subsets. Images whose label is all ignore (no person for human_parts)
    add nothing. Keys: ``mIoU`` and ``pixel_acc``, in percent.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, absent: AbsentClasses = "exclude") -> None:
        if absent not in ("exclude", "zero"):
            raise ValueError(f"absent must be 'exclude' or 'zero', got {absent!r}")
        self.num_classes = num_classes
        self.absent = absent
        super().__init__(ignore_index)

    @classmethod
    def from_spec(cls, spec: TaskSpec, dataset: str) -> SegmentationMetric:
        return cls(spec.outputs_for(dataset), spec.ignore_index)

    def _zero_state(self) -> dict[str, Tensor]:
        return {"confusion": torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)}

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred``: logits (B, K, H, W) / (K, H, W), or class ids shaped like ``target`` (B, H, W)."""
        labels = pred if pred.dim() == target.dim() else pred.argmax(dim=-3)
        target = target.to(labels.device).long()
        if labels.shape != target.shape:
            raise ValueError(f"prediction {tuple(labels.shape)} and target {tuple(target.shape)} differ in shape")
        valid = target != self.ignore_index
        gt, hit = target[valid], labels[valid].long()
        k = self.num_classes
        if gt.numel() and bool(((gt < 0) | (gt >= k)).any()):
            raise ValueError(
                f"target holds class ids outside [0, {k}) that are not the ignore value {self.ignore_index}; "
                f"check the dataset's label decoding or the task's num_outputs"
            )
        counts = torch.bincount(gt * k + hit, minlength=k * k).view(k, k)  # rows: ground truth, cols: prediction
        self._add(confusion=counts)

    def per_class_iou(self) -> Tensor:
        """IoU per class (K,), NaN for a class never seen in prediction or ground truth."""
        cm = self.state["confusion"].double()
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.nan)

    def compute(self) -> dict[str, float]:
        iou = self.per_class_iou()
        iou = iou.nan_to_num(0.0) if self.absent == "zero" else iou[~iou.isnan()]
        cm = self.state["confusion"]
        total = int(cm.sum())
        return {
            "mIoU": 100.0 * float(iou.mean()) if iou.numel() else float("nan"),
            "pixel_acc": 100.0 * int(cm.diagonal().sum()) / total if total else float("nan"),
        }
