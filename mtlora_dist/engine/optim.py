"""Optimizer parameter groups and the warmup + cosine schedule (spec Part A 4-5, B §7)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from mtlora_dist.config import OptimConfig

__all__ = ["build_optimizer", "no_decay_names", "param_groups", "scaled_lrs", "warmup_cosine", "warmup_length"]


def no_decay_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Trainable parameters without weight decay: every one of at most one dimension (norms, biases,
    scales) and those whose name matches one of ``patterns`` (fnmatch, e.g. ``*.bias``)."""
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.ndim <= 1 or any(fnmatchcase(name, pat) for pat in patterns))
    ]


def param_groups(model: nn.Module, weight_decay: float, no_decay: Sequence[str]) -> list[dict]:
    """Trainable parameters only, split into a decay group and a no-decay group
    (:func:`no_decay_names`). Frozen parameters never reach the optimizer, so ZeRO shards no state
    for them."""
    exempt = set(no_decay_names(model, no_decay))
    decay, no_decay_params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay_params if name in exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay_params, "weight_decay": 0.0, "name": "no_decay"},
    ]


def scaled_lrs(cfg: OptimConfig, global_batch: int) -> tuple[float, float, float]:
    """(base, warmup, min) learning rates, scaled by global_batch / 512 under ``lr_scaling: linear``."""
    factor = global_batch / 512 if cfg.lr_scaling == "linear" else 1.0
    return cfg.base_lr * factor, cfg.warmup_lr * factor, cfg.min_lr * factor


def warmup_length(cfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> int:
    """Warmup length in optimizer steps: ``warmup_steps``, else ``warmup_epochs`` x steps per epoch
    (truncated, as the official ``int(WARMUP_EPOCHS * n_iter_per_epoch)``), else ``warmup_fraction`` of
    the run, rounded."""
    if cfg.warmup_steps:
        return cfg.warmup_steps
    if cfg.warmup_epochs:
        return int(cfg.warmup_epochs * steps_per_epoch)
    return int(round(cfg.warmup_fraction * total_steps))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    base_lr: float,
    warmup_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    lag: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ``warmup_lr`` to ``base_lr``, then cosine down to ``min_lr``; per step.

    Optimizer step k runs at schedule index ``max(0, k - lag)``: ``lag=1`` is timm's
    ``CosineLRScheduler.step_update`` called after the optimizer step, as the official code does."""

    def factor(step: int) -> float:
        step = max(0, step - lag)
        if step < warmup_steps:
            return (warmup_lr + (base_lr - warmup_lr) * step / warmup_steps) / base_lr
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return (min_lr + (base_lr - min_lr) * cosine) / base_lr

    for group in optimizer.param_groups:
        group["lr"] = base_lr
        group["initial_lr"] = base_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, global_batch: int, total_steps: int, steps_per_epoch: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable groups and its per-step schedule, as ``cfg`` says (the engine's and
    the recipe tests' one path)."""
    base_lr, warmup_lr, min_lr = scaled_lrs(cfg, global_batch)
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay)
    optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=tuple(cfg.betas), eps=cfg.eps)
    warmup = warmup_length(cfg, total_steps, steps_per_epoch)
    lag = 1 if cfg.lr_timing == "lagged" else 0
    return optimizer, warmup_cosine(optimizer, base_lr, warmup_lr, min_lr, warmup, total_steps, lag)
