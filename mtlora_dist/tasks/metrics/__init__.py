"""Streaming, distributed-safe metrics, one module per metric family; ``build_metric`` picks the one
a task's registry entry names."""

from __future__ import annotations

from mtlora_dist.tasks.metrics.base import Metric
from mtlora_dist.tasks.metrics.depth import DepthMetric
from mtlora_dist.tasks.metrics.edge import EdgeMetric
from mtlora_dist.tasks.metrics.normals import NormalsMetric
from mtlora_dist.tasks.metrics.saliency import SaliencyMetric
from mtlora_dist.tasks.metrics.segmentation import SegmentationMetric
from mtlora_dist.tasks.registry import TaskSpec, get_task

__all__ = [
    "METRICS",
    "DepthMetric",
    "EdgeMetric",
    "Metric",
    "NormalsMetric",
    "SaliencyMetric",
    "SegmentationMetric",
    "build_metric",
]

METRICS: dict[str, type[Metric]] = {
    "segmentation": SegmentationMetric,
    "saliency": SaliencyMetric,
    "normals": NormalsMetric,
    "edge": EdgeMetric,
    "depth": DepthMetric,
}


def build_metric(task: str | TaskSpec, dataset: str) -> Metric:
    """The metric a task's registry entry names, configured for ``dataset``."""
    spec = get_task(task) if isinstance(task, str) else task
    if spec.metric not in METRICS:
        raise ValueError(f"task '{spec.name}' names unknown metric '{spec.metric}'; valid metrics: {sorted(METRICS)}")
    return METRICS[spec.metric].from_spec(spec, dataset)
