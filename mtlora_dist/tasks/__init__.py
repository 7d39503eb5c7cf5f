"""Dense tasks in one place: the registry (what a task is), its loss, its metric, and evaluation.

See ``docs/tasks.md`` for each task's target encoding, loss, weight and metric.
"""

from mtlora_dist.tasks.delta_m import PAPER_BASELINES, default_baselines, delta_m
from mtlora_dist.tasks.evaluation import MultiTaskEvaluator
from mtlora_dist.tasks.losses import MultiTaskLoss, build_loss
from mtlora_dist.tasks.metrics import build_metric
from mtlora_dist.tasks.registry import (
    DATASET_TASKS,
    IGNORE_INDEX,
    TASKS,
    TaskSpec,
    check_tasks,
    get_task,
    loss_weights,
    task_settings,
)

__all__ = [
    "DATASET_TASKS",
    "IGNORE_INDEX",
    "PAPER_BASELINES",
    "TASKS",
    "MultiTaskEvaluator",
    "MultiTaskLoss",
    "TaskSpec",
    "build_loss",
    "build_metric",
    "check_tasks",
    "default_baselines",
    "delta_m",
    "get_task",
    "loss_weights",
    "task_settings",
]
