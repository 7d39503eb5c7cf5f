"""Per-task multi-scale fusion and HRNet-style heads (spec Part B §3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FP32BatchNorm2d", "HRNetHead", "TaskDecoder"]


class FP32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises in fp32 whatever the training dtype, as autocast does.

    Under DeepSpeed bf16/fp16 the parameters are cast to the low dtype while the running statistics
    (buffers) stay fp32; computing in fp32 keeps the statistics precise and the dtypes consistent.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or self.running_mean is None
        out = F.batch_norm(x.float(), self.running_mean, self.running_var, weight, bias, use_batch_stats,
                           self.momentum, self.eps)
        return out.to(x.dtype)


class HRNetHead(nn.Module):
    """Resize every scale to the finest, concatenate, 1x1 conv -> BN -> ReLU -> 1x1 conv to the outputs."""

    def __init__(self, in_channels: Sequence[int], hidden_channels: int, num_outputs: int) -> None:
        super().__init__()
        self.fuse = nn.Sequential(
            nn.Conv2d(sum(in_channels), hidden_channels, kernel_size=1),
            FP32BatchNorm2d(hidden_channels, momentum=0.1),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(hidden_channels, num_outputs, kernel_size=1)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        size = maps[0].shape[-2:]
        resized = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        return self.classifier(self.fuse(torch.cat(resized, dim=1)))


class TaskDecoder(nn.Module):
    """One task's decoder: a bias-free 1x1 channel reducer per scale, then the head.

    The reducers are stored as ``Conv2d`` (as in the official code) but applied as a linear map on the
    NHWC features, which saves a full-size layout change per scale.
    """

    def __init__(self, in_dims: Sequence[int], channels: Sequence[int], hidden_channels: int, num_outputs: int) -> None:
        super().__init__()
        if len(in_dims) != len(channels):
            raise ValueError(f"model.decoder_channels has {len(channels)} entries but the backbone "
                             f"emits {len(in_dims)} scales")
        self.reducers = nn.ModuleList(nn.Conv2d(d, c, kernel_size=1, bias=False) for d, c in zip(in_dims, channels))
        self.head = HRNetHead(channels, hidden_channels, num_outputs)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        # features[i]: (B, h_i, w_i, C_i) NHWC -> reduced (B, c_i, h_i, w_i) NCHW
        maps = [F.linear(f, r.weight.flatten(1)).permute(0, 3, 1, 2) for f, r in zip(features, self.reducers)]
        return self.head(maps)
