"""Synchronised BatchNorm that keeps the heads' fp32 contract, on every device and backend.

torch's ``convert_sync_batchnorm`` replaces every BatchNorm subclass with a plain ``SyncBatchNorm``:
:class:`~mtlora_dist.models.decoders.FP32BatchNorm2d` then loses its promise (fp32 normalisation and
fp32 running statistics under bf16) and :func:`~mtlora_dist.models.precision.align_buffers` no longer
recognises it. torch's SyncBatchNorm also refuses CPU input in some releases, so the path that runs on
2+ GPUs was one no CPU test reached.

:class:`FP32SyncBatchNorm2d` is an ``FP32BatchNorm2d`` (same parameters, buffers and state_dict keys,
so checkpoints load either way) whose training forward, in a group of two or more ranks, sums
per-channel ``sum(x)``, ``sum(x^2)`` and the element count over the default group in fp32 through
:func:`mtlora_dist.comm.all_reduce_with_grad`: one collective per layer and forward, one in backward,
on the model's device (gloo on CPUs, NCCL on GPUs), the same code on both. Evaluation and single-rank
training are ``FP32BatchNorm2d`` itself. The variance is ``E[x^2] - E[x]^2`` in fp32, as torch's
SyncBatchNorm combines per-rank moments: exact enough for the heads' pre-activation maps, whose
per-channel means are not large against their spread.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlora_dist import comm
from mtlora_dist.models.decoders import FP32BatchNorm2d

__all__ = ["FP32SyncBatchNorm2d", "convert_sync_batchnorm"]


class FP32SyncBatchNorm2d(FP32BatchNorm2d):
    """BatchNorm over the batch of every rank together, normalising in fp32 with fp32 statistics."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and comm.world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        xf = x.float()  # NCHW
        mean, var, count = _global_moments(xf)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float()
        out = (xf - mean[None, :, None, None]) * scale[None, :, None, None]
        if self.bias is not None:
            out = out + self.bias.float()[None, :, None, None]
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        """As ``F.batch_norm``: exponential average (``momentum``) or cumulative (``momentum=None``) of
        the mean and the unbiased variance; tensors only, so no host sync."""
        self.num_batches_tracked.add_(1)
        weight = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.float()
        unbiased = var * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean, weight)
        self.running_var.lerp_(unbiased, weight)


def _global_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (fp32, NCHW) over every rank's batch, and the
    element count per channel (a 0-d tensor). Ranks may hold different batch sizes."""
    channels = x.shape[1]
    count = x.new_full((1,), x.numel() // max(channels, 1))
    local = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count])
    total = comm.all_reduce_with_grad(local)
    n = total[-1]
    mean = total[:channels] / n
    var = (total[channels : 2 * channels] / n - mean * mean).clamp_min(0)
    return mean, var, n


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` (``FP32BatchNorm2d`` included) replaced by an
    :class:`FP32SyncBatchNorm2d` holding the same parameters and buffers (not copies), in train/eval
    mode as before; returns the new root when ``module`` itself is one. Other BatchNorm kinds
    (1d/3d, torch's SyncBatchNorm) are refused: nothing in this package builds them."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, FP32SyncBatchNorm2d):
        return _synced(module)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def _synced(bn: nn.modules.batchnorm._BatchNorm) -> FP32SyncBatchNorm2d:
    if type(bn) not in (nn.BatchNorm2d, FP32BatchNorm2d):
        raise TypeError(
            f"convert_sync_batchnorm: cannot synchronise {type(bn).__name__}; only BatchNorm2d layers are "
            "supported. Set model.sync_bn=false, or build the head with FP32BatchNorm2d"
        )
    new = FP32SyncBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new._parameters = bn._parameters  # the same Parameter objects: optimizers and tied weights keep them
    new._buffers = bn._buffers
    new.train(bn.training)
    return new
