"""Per-threshold counts for binary maps in O(pixels), not O(pixels x thresholds).

Each probability gets its *level*: how many thresholds lie strictly below it, so ``p > t_j`` iff
``level > j``. Histograms of levels (split by ground truth) turn into per-threshold counts of
predicted positives by a suffix sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["above_threshold", "level_histograms"]


def level_histograms(prob: Tensor, positive: Tensor, valid: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """Histograms of threshold levels for valid GT-positive and GT-negative pixels.

    ``prob``, ``positive``, ``valid``: (G, N) for G groups (images, or 1 for the whole batch).
    Returns two int64 tensors (G, J+1), J = number of thresholds.
    """
    groups, levels = prob.shape[0], thresholds.numel() + 1
    # thresholds are cast to the probabilities' dtype, so the comparison is the one a `prob > t` would make
    level = torch.bucketize(prob, thresholds.to(prob), right=False)  # (G, N) in [0, J]
    index = level + levels * torch.arange(groups, device=prob.device).unsqueeze(1)  # one bin range per group

    def histogram(mask: Tensor) -> Tensor:
        return torch.bincount(index[mask], minlength=groups * levels).view(groups, levels)

    return histogram(valid & positive), histogram(valid & ~positive)


def above_threshold(hist: Tensor) -> Tensor:
    """(G, J+1) level histogram -> (G, J) number of pixels with ``p > t_j``, i.e. ``level >= j + 1``."""
    return hist.flip(-1).cumsum(-1).flip(-1)[..., 1:]
