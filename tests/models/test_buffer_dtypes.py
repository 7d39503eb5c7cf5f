"""Buffer dtypes under bf16, whichever way the engine treated the buffers (``models/precision.py``)."""

from __future__ import annotations

import pytest
import torch

from mtlora_dist.config import load_config
from mtlora_dist.models import build_model
from mtlora_dist.models.decoders import FP32BatchNorm2d
from mtlora_dist.models.precision import align_buffers


def _quickstart_model(dynamic_img_size: bool) -> torch.nn.Module:
    cfg = load_config(None, [f"model.dynamic_img_size={str(dynamic_img_size).lower()}"])  # the tiny quickstart model
    return build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset), cfg.model.img_size


def _cast_like_deepspeed(model: torch.nn.Module, dtype: torch.dtype, buffers: bool) -> None:
    """What DeepSpeed's bf16 engine does: parameters always; buffers too in 0.16.0/0.18.0/0.19.0."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    if buffers:
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.is_floating_point():
                    module._buffers[name] = buf.to(dtype)


def _train_step(model: torch.nn.Module, img_size) -> dict[str, torch.Tensor]:
    model.train()
    outputs = model(torch.randn(2, 3, *img_size, dtype=torch.bfloat16))
    sum(o.float().mean() for o in outputs.values()).backward()
    return outputs


@pytest.mark.parametrize("buffers_cast", [False, True], ids=["ds-0.19.8", "ds-casts-buffers"])
@pytest.mark.parametrize("dynamic_img_size", [True, False])
def test_bf16_forward_backward_after_align_buffers(dynamic_img_size, buffers_cast):
    torch.manual_seed(0)
    model, img_size = _quickstart_model(dynamic_img_size)
    _cast_like_deepspeed(model, torch.bfloat16, buffers_cast)
    align_buffers(model, torch.bfloat16)
    outputs = _train_step(model, img_size)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o.float()).all() for o in outputs.values())
    norms = [m for m in model.modules() if isinstance(m, FP32BatchNorm2d)]
    assert norms and all(m.running_mean.dtype == torch.float32 and m.running_var.dtype == torch.float32 for m in norms)
    masks = [m.attn_mask for m in model.modules() if getattr(m, "attn_mask", None) is not None]
    assert (len(masks) > 0) != dynamic_img_size  # static size: precomputed shifted-window masks exist
    assert all(mask.dtype == torch.bfloat16 for mask in masks)


@pytest.mark.parametrize(
    "dynamic_img_size,buffers_cast", [(False, False), (True, True)], ids=["static-mask-fp32", "bn-stats-bf16"]
)
def test_without_align_buffers_bf16_fails(dynamic_img_size, buffers_cast):
    """The two crashes align_buffers exists for (so the test above can fail)."""
    torch.manual_seed(0)
    model, img_size = _quickstart_model(dynamic_img_size)
    _cast_like_deepspeed(model, torch.bfloat16, buffers_cast)
    with pytest.raises(RuntimeError, match="dtype|scalar type"):
        _train_step(model, img_size)


def test_align_buffers_keeps_buffers_registered_and_persistent():
    model, _ = _quickstart_model(False)
    before = set(model.state_dict())
    _cast_like_deepspeed(model, torch.bfloat16, True)
    align_buffers(model, torch.bfloat16)
    assert set(model.state_dict()) == before  # attn_mask stays non-persistent, BN stats stay in the state dict
