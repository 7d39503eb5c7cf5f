"""Multi-task evaluation: per-task metrics at each label's own resolution, Delta-m, table and JSON.

Protocols: by default (``"original"``) the loader keeps every label at its original size (padded with
the ignore value to the batch maximum, bottom/right) and sends each sample's true ``label_size``;
predictions made at the input size are resized bilinearly to it here. Under ``"official"`` the
loader resizes labels to the input size, as the official code does (B13), so ``label_size`` equals the
input size and the same code path applies: the evaluator only records the protocol's name.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlora_dist.tasks.delta_m import default_baselines, delta_m, relative_change
from mtlora_dist.tasks.metrics import build_metric
from mtlora_dist.tasks.registry import check_tasks, get_task, labeled_key
from mtlora_dist.tasks.results_table import text_table

__all__ = ["MultiTaskEvaluator", "at_label_size"]


def at_label_size(pred: Tensor, target: Tensor, label_size: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (prediction, label) pairs with the prediction bilinearly resized to each sample's label size.

    ``pred`` (B, K, H, W) at the input size; ``target`` (B, [C,] Hmax, Wmax) padded bottom/right;
    ``label_size`` (B, 2) int64 true (h, w) per sample, or ``None`` for "the whole target". Samples of
    equal size are resized together, so a batch of one size costs one ``interpolate``.
    """
    batch = target.shape[0]
    sizes = [tuple(target.shape[-2:])] * batch if label_size is None else [tuple(s) for s in label_size.tolist()]
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, size in enumerate(sizes):
        groups[size].append(i)
    for (h, w), members in groups.items():
        p = pred[members].float()
        if p.shape[-2:] != (h, w):
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        yield p, target[members][..., :h, :w]


class MultiTaskEvaluator:
    """Streams predictions into one metric per task and reports them with Delta-m.

    ``compute`` sums the metric state over ranks (every rank must call it) and returns
    ``{task: {metric: value}, ..., "delta_m": float | None, "delta_m_tasks": [...], "protocol": str}``.
    Baselines map task -> single-task value of its primary metric; default: the paper's Swin-T
    PASCAL-Context numbers (none for NYUD).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        dataset: str,
        baselines: Mapping[str, float] | None = None,
        protocol: str = "original",
    ) -> None:
        check_tasks(dataset, tasks)
        self.tasks = tuple(tasks)
        self.dataset = dataset
        self.protocol = protocol
        self.baselines = default_baselines(dataset) if baselines is None else dict(baselines)
        self.metrics = {t: build_metric(t, dataset) for t in self.tasks}

    @torch.no_grad()
    def update(self, preds: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        """Add one batch: ``preds[task]`` logits (B, K, H, W); ``batch[task]`` labels, ``batch["label_size"]``,
        and ``batch["labeled/<task>"]`` (optional) marking the samples that have a ``task`` label."""
        for task, metric in self.metrics.items():
            if task not in preds or task not in batch:
                raise KeyError(
                    f"task '{task}' missing from the predictions ({sorted(preds)}) or the batch ({sorted(batch)})"
                )
            pred, target, label_size = preds[task], batch[task], batch.get("label_size")
            has = batch.get(labeled_key(task))
            if has is not None and not bool(has.all()):  # partial labels: samples without one are not scored
                if not bool(has.any()):
                    continue
                keep = has.to(pred.device)
                pred, target = pred[keep], target[keep.to(target.device)]
                label_size = None if label_size is None else label_size[keep.to(label_size.device)]
            for p, t in at_label_size(pred, target, label_size):
                metric.update(p, t)

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def compute(self) -> dict[str, Any]:
        """All-reduce (on copies: calling twice never double-counts) and compute every metric and Delta-m."""
        results: dict[str, Any] = {t: m.reduced().compute() for t, m in self.metrics.items()}
        results["delta_m"] = delta_m(results, self.baselines, self.tasks)
        results["delta_m_tasks"] = [t for t in self.tasks if t in self.baselines]
        results["protocol"] = self.protocol
        return results

    def to_json(self, results: Mapping[str, Any]) -> dict[str, Any]:
        """The results as a plain, strictly JSON-serialisable dict (NaN becomes ``None``)."""
        tasks = {}
        for task in self.tasks:
            spec = get_task(task)
            value = results[task].get(spec.primary_metric)
            baseline = self.baselines.get(task)
            tasks[task] = {
                "metrics": {k: _finite(v) for k, v in results[task].items()},
                "primary_metric": spec.primary_metric,
                "higher_is_better": spec.higher_is_better,
                "baseline": baseline,
                "relative_change": None if baseline is None else _finite(relative_change(task, value, baseline)),
                "in_delta_m": baseline is not None,
            }
        return {
            "dataset": self.dataset,
            "protocol": results.get("protocol", self.protocol),
            "tasks": tasks,
            "delta_m": _finite(results.get("delta_m")),
        }

    def table(self, results: Mapping[str, Any]) -> str:
        """A fixed-width table: one row per task and metric; baseline and change on the primary metric."""
        return text_table(self.to_json(results))


def _finite(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
