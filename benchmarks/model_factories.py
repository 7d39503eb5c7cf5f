"""Real models for benchmarks that take ``--model module:callable``."""

from __future__ import annotations

from torch import nn

from mtlora_dist.config import load_config
from mtlora_dist.models import build_model


def from_config(path: str, *overrides: str) -> nn.Module:
    cfg = load_config(path, ["model.pretrained=null", *overrides])
    return build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)


def swin_t_r64() -> nn.Module:
    """The paper's Swin-T, MTLoRA r=64 per-task model (PASCAL-Context, 4 tasks)."""
    return from_config("configs/pascal_swin_t_r64.yaml", "model.img_size=[224,224]")
