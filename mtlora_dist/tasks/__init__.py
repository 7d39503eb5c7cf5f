"""Dense tasks in one place: the registry (what a task and a dataset are), each task's loss, its metric,
and evaluation.

See ``docs/tasks.md`` for each task's target encoding, loss, weight and metric. The registry is
imported eagerly (torch-free: configs are checked against it before torch loads); losses, metrics and
evaluation on first use (PEP 562).
"""

from mtlora_dist.lazy import lazy_exports
from mtlora_dist.tasks.registry import (
    DATASET_TASKS,
    DATASETS,
    IGNORE_INDEX,
    TASKS,
    DatasetSpec,
    TaskSpec,
    check_tasks,
    get_dataset,
    get_task,
    loss_weights,
    register_dataset,
    task_settings,
)

__all__ = [
    "DATASETS",
    "DATASET_TASKS",
    "IGNORE_INDEX",
    "PAPER_BASELINES",
    "TASKS",
    "DatasetSpec",
    "MultiTaskEvaluator",
    "MultiTaskLoss",
    "TaskSpec",
    "build_loss",
    "build_metric",
    "check_tasks",
    "default_baselines",
    "delta_m",
    "get_dataset",
    "get_task",
    "loss_weights",
    "register_dataset",
    "task_settings",
]

__getattr__ = lazy_exports(
    __name__,
    delta_m=["PAPER_BASELINES", "default_baselines", "delta_m"],
    evaluation=["MultiTaskEvaluator"],
    losses=["MultiTaskLoss", "build_loss"],
    metrics=["build_metric"],
)
