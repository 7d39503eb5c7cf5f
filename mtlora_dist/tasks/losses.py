"""Per-task losses and their weighted sum (spec Part B §5, with Part A §7's empty-batch rule).

Every loss is a mean over the batch's *valid* pixels written as ``masked sum / max(count, 1)``. With
no valid pixel (an image without people for ``human_parts``) it is exactly 0 and still a function
of the prediction, so backward yields zero gradients and every rank runs the same graph; the
official ``mean`` over nothing is NaN (spec B14).

Targets arrive as the data loader makes them (see ``docs/tasks.md``): class ids (uint8/int64), binary
maps (0/1), unit normals (3 channels) or metres, with 255 marking pixels without supervision. Each
loss casts what it needs to float32, so it can run on bf16/fp16 logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlora_dist.tasks.balancing import Balancer
from mtlora_dist.tasks.registry import IGNORE_INDEX, TaskSpec, get_task, loss_weights

__all__ = [
    "LOSSES",
    "BalancedBCELoss",
    "CrossEntropyLoss",
    "DepthL1Loss",
    "MultiTaskLoss",
    "NormalsL1Loss",
    "balanced_bce_terms",
    "build_loss",
    "masked_mean",
]


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` where ``valid``; exactly 0, still attached to the graph, when none is."""
    kept = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() / valid.sum().clamp_min(1)


def _map_target(target: Tensor) -> Tensor:
    """A single-channel target as (B, H, W), accepting (B, 1, H, W)."""
    return target.squeeze(1) if target.dim() == 4 and target.shape[1] == 1 else target


def _check_spatial(pred: Tensor, target: Tensor, name: str) -> None:
    if pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"{name}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in batch or "
            f"spatial size; resize the logits to the label size before the loss"
        )


class CrossEntropyLoss(nn.Module):
    """Pixel-wise softmax cross-entropy over valid pixels (semseg, human_parts)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """``logits`` (B, K, H, W); ``target`` (B, H, W) class ids."""
        target = _map_target(target).long()
        _check_spatial(logits, target, "cross_entropy")
        valid = target != self.ignore_index
        # ignored pixels get a dummy class so the per-pixel CE stays finite, then are masked out
        per_pixel = F.cross_entropy(logits.float(), target.masked_fill(~valid, 0), reduction="none")
        return masked_mean(per_pixel, valid)


def balanced_bce_terms(
    logits: Tensor, target: Tensor, pos_weight: float | None, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Weighted per-pixel BCE-with-logits and the valid mask, both (B, H, W).

    Positives are weighted ``w`` and negatives ``1 - w``; ``w = pos_weight`` if given (edges: 0.95),
    else ``w`` = fraction of negative valid pixels in the batch (HED-style, saliency). Shared by the
    loss and the edge metric so both weigh pixels the same way.
    """
    target = _map_target(target)
    _check_spatial(logits, target, "balanced_bce")
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"balanced_bce expects logits of shape (B, 1, H, W), got {tuple(logits.shape)}")
    x = logits.float().squeeze(1)  # (B, H, W)
    valid = target != ignore_index
    positive = valid & (target >= 0.5)
    if pos_weight is None:
        negatives = (valid & ~positive).sum()
        w = negatives.float() / valid.sum().clamp_min(1)  # a label statistic: no gradient
    else:
        w = torch.tensor(float(pos_weight), device=x.device)
    per_pixel = F.binary_cross_entropy_with_logits(x, positive.float(), reduction="none")
    return per_pixel * torch.where(positive, w, 1.0 - w), valid


class BalancedBCELoss(nn.Module):
    """Class-balanced binary cross-entropy over valid pixels (saliency, edges)."""

    def __init__(self, pos_weight: float | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.pos_weight = pos_weight
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """``logits`` (B, 1, H, W); ``target`` (B, H, W) with 0/1 and the ignore value."""
        terms, valid = balanced_bce_terms(logits, target, self.pos_weight, self.ignore_index)
        return masked_mean(terms, valid)

    def extra_repr(self) -> str:
        return f"pos_weight={self.pos_weight}"


class NormalsL1Loss(nn.Module):
    """L1 between the L2-normalised prediction and the unit target, per valid vector component."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """``pred`` and ``target`` (B, 3, H, W); ignored pixels have all three target channels at 255."""
        _check_spatial(pred, target, "normals_l1")
        target = target.float()
        valid = (target != self.ignore_index).all(dim=1, keepdim=True)  # (B, 1, H, W)
        error = (F.normalize(pred.float(), dim=1) - target.masked_fill(~valid, 0.0)).abs()
        return masked_mean(error, valid.expand_as(error))  # mean over 3 components per valid pixel


class DepthL1Loss(nn.Module):
    """L1 in metres over pixels with a depth (label neither 0 nor the ignore value)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """``pred`` (B, 1, H, W); ``target`` (B, H, W) metres."""
        target = _map_target(target).float()
        _check_spatial(pred, target, "depth_l1")
        valid = (target != self.ignore_index) & (target > 0) & torch.isfinite(target)
        error = (pred.float().squeeze(1) - target.masked_fill(~valid, 0.0)).abs()
        return masked_mean(error, valid)


LOSSES: dict[str, type[nn.Module]] = {
    "cross_entropy": CrossEntropyLoss,
    "balanced_bce": BalancedBCELoss,
    "normals_l1": NormalsL1Loss,
    "depth_l1": DepthL1Loss,
}


def build_loss(task: str | TaskSpec) -> nn.Module:
    """The loss module a task's registry entry names, with its ignore value and extra arguments."""
    spec = get_task(task) if isinstance(task, str) else task
    if spec.loss not in LOSSES:
        raise ValueError(f"task '{spec.name}' names unknown loss '{spec.loss}'; valid losses: {sorted(LOSSES)}")
    return LOSSES[spec.loss](ignore_index=spec.ignore_index, **spec.loss_kwargs)


class MultiTaskLoss(nn.Module):
    """``sum_t w_t * L_t`` over the trained tasks, weights from the registry unless overridden, and a
    :class:`~mtlora_dist.tasks.balancing.Balancer` (``loss.balancing``) to weigh them further; without
    one, the fixed weights alone (the same expression as before balancers existed, bit for bit).

    Every task's loss is computed on every call (an all-ignore target gives a zero loss attached to
    the graph), so all ranks run the same backward whatever their batch holds. In training it is
    called once per micro-batch, and :meth:`end_step` once per optimizer step.
    """

    def __init__(
        self, tasks: list[str], weights: Mapping[str, float] | None = None, balancer: Balancer | None = None
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("MultiTaskLoss needs at least one task")
        self.tasks = tuple(tasks)
        self.weights = loss_weights(self.tasks, weights)
        self.losses = nn.ModuleDict({t: build_loss(t) for t in self.tasks})
        self.balancer = balancer or Balancer(self.tasks, self.weights)
        if self.balancer.tasks != self.tasks:
            raise ValueError(f"the balancer weighs tasks {list(self.balancer.tasks)}, the loss {list(self.tasks)}")

    def forward(self, preds: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the balanced total and each task's unweighted loss (detached, for logging)."""
        missing = [t for t in self.tasks if t not in preds or t not in batch]
        if missing:
            raise KeyError(
                f"task(s) {missing} missing from the predictions or the batch; "
                f"predictions have {sorted(preds)}, batch has {sorted(batch)}"
            )
        per_task = {t: self.losses[t](preds[t], batch[t]) for t in self.tasks}
        total = self.balancer.combine(per_task, lambda t, pred: self.losses[t](pred, batch[t]))
        return total, {t: loss.detach() for t, loss in per_task.items()}

    def end_step(self) -> None:
        """After the optimizer step, on every rank: the balancer's update (it may all-reduce)."""
        self.balancer.end_step()

    def weights_used(self) -> dict[str, Tensor]:
        """Each task's effective weight in the last micro-batch's total (device scalars, for logging)."""
        return self.balancer.weights_used()

    def extra_repr(self) -> str:
        return f"weights={self.weights}, balancing={self.balancer.name}"
