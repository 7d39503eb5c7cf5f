"""Parameter counts by group, as trained and as the paper counts them (spec Part A 3, B §4.2)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from mtlora_dist.models.trainable import parameter_group

__all__ = ["parameter_report", "format_report", "count_parameters"]


def parameter_report(model: nn.Module) -> dict:
    """``{"trainable", "trainable_as_paper", "total", "groups": {group: {"trainable", "total"}}}``.

    ``trainable_as_paper`` adds the parameters we never create because they could never train
    (the paper's counts include them).
    """
    trainable, total = Counter(), Counter()
    for name, p in model.named_parameters():
        group = parameter_group(name)
        total[group] += p.numel()
        if p.requires_grad:
            trainable[group] += p.numel()
    pruned = int(getattr(model, "pruned_parameters", 0))
    n_trainable = sum(trainable.values())
    return {
        "trainable": n_trainable,
        "trainable_as_paper": n_trainable + pruned,
        "total": sum(total.values()),
        "pruned_dead": pruned,
        "groups": {g: {"trainable": trainable[g], "total": total[g]} for g in sorted(total)},
    }


def format_report(report: dict) -> str:
    """A plain-text table of :func:`parameter_report`."""
    rows = [f"{'group':<24}{'trainable':>14}{'total':>14}"]
    for group, counts in report["groups"].items():
        rows.append(f"{group:<24}{counts['trainable']:>14,}{counts['total']:>14,}")
    rows.append("-" * 52)
    rows.append(f"{'trainable':<24}{report['trainable']:>14,}")
    rows.append(
        f"{'trainable (as paper)':<24}{report['trainable_as_paper']:>14,}"
        f"   (+{report['pruned_dead']:,} never-trained, not created)"
    )
    rows.append(f"{'total':<24}{report['total']:>14,}")
    return "\n".join(rows)


def count_parameters(model_cfg, adapter, trainable, tasks: Sequence[str], dataset: str) -> dict:
    """:func:`parameter_report` of the configured model, built on the ``meta`` device: shapes without
    memory or initialisation (8x faster than a real Swin-T), and no pretrained file is read."""
    import dataclasses

    from mtlora_dist.models.multitask import build_model

    with torch.device("meta"):
        model = build_model(dataclasses.replace(model_cfg, pretrained=None), adapter, trainable, tasks, dataset)
    return parameter_report(model)
