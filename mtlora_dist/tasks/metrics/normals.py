"""Surface-normal angular error: mean, median, RMSE and shares under 11.25/22.5/30 degrees."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlora_dist.tasks.metrics.base import Metric
from mtlora_dist.tasks.registry import IGNORE_INDEX

__all__ = ["NormalsMetric"]


class NormalsMetric(Metric):
    """Angle between the L2-normalised prediction and the ground truth, per valid pixel, in degrees.

    ``mean`` is the mean angle (what the official code and the paper call "rmse", B12), ``rmse`` the
    root of the mean squared angle, ``median`` the median and ``within_<t>`` the percentage of pixels
    with an angle below ``t``. The median comes from a histogram with ``bin_width``-degree bins
    (default 0.01) summed across ranks: it is the centre of the bin holding the middle pixel (the mean
    of the two middle bins for an even count), so it is exact to ``bin_width / 2`` (0.005 degrees).
    Predictions need not be unit length: the metric normalises them itself, so bilinearly resized
    normals are re-normalised here. Ignored pixels have all three target channels at the ignore value.
    """

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        bin_width: float = 0.01,
        within: Sequence[float] = (11.25, 22.5, 30.0),
    ) -> None:
        self.bin_width = bin_width
        self.num_bins = math.ceil(180.0 / bin_width)
        self.within = tuple(within)
        super().__init__(ignore_index)

    def _zero_state(self) -> dict[str, Tensor]:
        return {
            "sum": torch.zeros((), dtype=torch.float64),
            "sum_sq": torch.zeros((), dtype=torch.float64),
            "count": torch.zeros((), dtype=torch.int64),
            "within": torch.zeros(len(self.within), dtype=torch.int64),
            "histogram": torch.zeros(self.num_bins, dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred`` and ``target``: (B, 3, H, W) or (3, H, W)."""
        pred = pred.reshape(-1, *pred.shape[-3:]).float()  # (B, 3, H, W)
        target = target.reshape(-1, *target.shape[-3:]).to(pred.device).float()
        if pred.shape != target.shape or pred.shape[1] != 3:
            raise ValueError(
                f"expected prediction and target (B, 3, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        valid = (target != self.ignore_index).all(dim=1) & (target.norm(dim=1) > 0)  # (B, H, W)
        p, t = F.normalize(pred, dim=1), F.normalize(target, dim=1)
        # 2 atan2(|p - t|, |p + t|) is the angle, accurate also near 0 and 180 degrees (unlike acos)
        # float32 angles (error ~1e-5 degrees), float64 sums
        angle = torch.rad2deg(2 * torch.atan2((p - t).norm(dim=1), (p + t).norm(dim=1)))[valid].double()  # (n,)
        bins = (angle / self.bin_width).long().clamp_(0, self.num_bins - 1)
        limits = torch.tensor(self.within, dtype=angle.dtype, device=angle.device)
        self._add(
            sum=angle.sum(),
            sum_sq=angle.square().sum(),
            count=torch.tensor(angle.numel(), device=angle.device),
            within=(angle.unsqueeze(1) < limits).sum(0),
            histogram=torch.bincount(bins, minlength=self.num_bins),
        )

    def _median(self, n: int) -> float:
        cdf = self.state["histogram"].cumsum(0)
        middle = torch.tensor([(n + 1) // 2, n // 2 + 1], device=cdf.device)  # 1-based ranks of the middle pair
        bins = torch.searchsorted(cdf, middle).double()  # first bin whose cumulative count reaches each rank
        return float((bins.mean() + 0.5) * self.bin_width)

    def compute(self) -> dict[str, float]:
        n = int(self.state["count"])
        if n == 0:
            return {k: float("nan") for k in ("mean", "median", "rmse", *self._within_keys())}
        result = {
            "mean": float(self.state["sum"]) / n,
            "median": self._median(n),
            "rmse": math.sqrt(float(self.state["sum_sq"]) / n),
        }
        result.update({k: 100.0 * int(c) / n for k, c in zip(self._within_keys(), self.state["within"])})
        return result

    def _within_keys(self) -> list[str]:
        return [f"within_{t:g}" for t in self.within]
