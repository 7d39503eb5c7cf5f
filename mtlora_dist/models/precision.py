"""Buffer dtypes for low-precision training, independent of what the engine did to them.

DeepSpeed's bf16/fp16 engines cast the model's parameters; whether they cast its *buffers* too
depends on the release (0.16.0, 0.18.0 and 0.19.0 cast every buffer, 0.19.8 keeps them fp32). Each
choice breaks one consumer:

- :class:`~mtlora_dist.models.decoders.FP32BatchNorm2d` normalises in fp32 and needs fp32 running
  statistics ("expected scalar type Float but found BFloat16" once they are cast);
- timm Swin's precomputed shifted-window ``attn_mask`` (``model.dynamic_img_size=false``) is added to
  the attention logits: left fp32 it promotes bf16 attention to fp32 and the next matmul fails
  ("expected m1 and m2 to have the same dtype").

:func:`align_buffers` gives each of them the dtype its consumer computes in; the engine set-up and
the checkpoint restore call it after the parameters have their dtype.
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from mtlora_dist.models.decoders import FP32BatchNorm2d

__all__ = ["align_buffers"]


def align_buffers(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """BatchNorm statistics in fp32, attention masks in ``compute_dtype``; in place, returns ``model``."""
    for module in model.modules():
        if isinstance(module, FP32BatchNorm2d):
            for name in ("running_mean", "running_var"):
                _cast_buffer(module, name, torch.float32)
        elif isinstance(module, SwinTransformerBlock):
            _cast_buffer(module, "attn_mask", compute_dtype)
    return model


def _cast_buffer(module: nn.Module, name: str, dtype: torch.dtype) -> None:
    buffer = getattr(module, name, None)
    if isinstance(buffer, torch.Tensor) and buffer.is_floating_point() and buffer.dtype != dtype:
        module._buffers[name] = buffer.to(dtype)  # keeps the buffer registered (and its persistence)
