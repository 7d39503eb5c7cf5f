"""Optimizer parameter groups and the warmup + cosine schedule (spec Part A 4-5, B §7)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mtlora_dist.config import OptimConfig
from mtlora_dist.models.trainable import NO_DECAY_GROUPS, parameter_group

__all__ = ["param_groups", "scaled_lrs", "warmup_cosine"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only, split into decay (LoRA and decoder weights) and no-decay
    (norms, biases, relative-position tables, scales) groups. Frozen parameters never reach the
    optimizer, so ZeRO shards no state for them."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or parameter_group(name) in NO_DECAY_GROUPS
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def scaled_lrs(cfg: OptimConfig, global_batch: int) -> tuple[float, float, float]:
    """(base, warmup, min) learning rates, scaled by global_batch / 512 under ``lr_scaling: linear``."""
    factor = global_batch / 512 if cfg.lr_scaling == "linear" else 1.0
    return cfg.base_lr * factor, cfg.warmup_lr * factor, cfg.min_lr * factor


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    base_lr: float,
    warmup_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ``warmup_lr`` to ``base_lr``, then cosine down to ``min_lr``; per step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (warmup_lr + (base_lr - warmup_lr) * step / warmup_steps) / base_lr
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return (min_lr + (base_lr - min_lr) * cosine) / base_lr

    for group in optimizer.param_groups:
        group["lr"] = base_lr
        group["initial_lr"] = base_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
