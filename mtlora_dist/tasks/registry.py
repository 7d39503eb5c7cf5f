"""The one place that says what each dense task is.

A task is data, not a branch: its head width, how its target is stored and resized, its loss weight,
its ignore value and its metric all live in one :class:`TaskSpec`. Adding a task or a dataset is a
new entry here, not an ``if task == ...`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

IGNORE_INDEX = 255

TargetKind = Literal["class_map", "binary_map", "normals", "depth"]
Interpolation = Literal["nearest", "normals"]


@dataclass(frozen=True)
class TaskSpec:
    """Static facts about one task.

    Attributes:
        name: task key used in configs, batches and model outputs.
        target_kind: how the label is stored and decoded (class ids, a binary map, unit normals, metres).
        interpolation: how the label is resized: ``nearest`` for ids and maps, ``normals`` for bicubic
            plus renormalisation (Part B §7).
        loss_weight: default weight in the total loss (Part B §5).
        num_outputs: prediction channels per dataset (class maps differ between datasets).
        ignore_index: label value that marks pixels without supervision.
        higher_is_better: direction of the task's primary metric (for Delta-m).
        primary_metric: the metric that enters Delta-m.
        loss: name of the loss in ``mtlora_dist.tasks.losses.LOSSES``.
        metric: name of the metric family in ``mtlora_dist.tasks.metrics.METRICS``.
        loss_kwargs: extra constructor arguments of the loss (e.g. the edge loss's fixed
            ``pos_weight``); the edge metric reads the same value, so it lives here once.
    """

    name: str
    target_kind: TargetKind
    interpolation: Interpolation
    loss_weight: float
    num_outputs: dict[str, int]
    primary_metric: str
    higher_is_better: bool
    ignore_index: int = IGNORE_INDEX
    image_interpolation: str = field(default="bicubic")
    loss: str = field(kw_only=True)
    metric: str = field(kw_only=True)
    loss_kwargs: Mapping[str, Any] = field(default_factory=dict, kw_only=True)

    def outputs_for(self, dataset: str) -> int:
        """Prediction channels of this task on ``dataset``."""
        try:
            return self.num_outputs[dataset]
        except KeyError:
            raise ValueError(
                f"task '{self.name}' is not defined for dataset '{dataset}'; it exists for: {sorted(self.num_outputs)}"
            ) from None


# A table, one task a row: left as written by the formatter.
# fmt: off
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("semseg", "class_map", "nearest", 1.0, {"pascal_context": 21, "nyud": 40}, "mIoU", True,
                 loss="cross_entropy", metric="segmentation"),
        TaskSpec("human_parts", "class_map", "nearest", 2.0, {"pascal_context": 7}, "mIoU", True,
                 loss="cross_entropy", metric="segmentation"),
        TaskSpec("sal", "binary_map", "nearest", 5.0, {"pascal_context": 1}, "mIoU", True,
                 loss="balanced_bce", metric="saliency"),  # pos_weight None: beta from the batch
        TaskSpec("normals", "normals", "normals", 10.0, {"pascal_context": 3, "nyud": 3}, "mean", False,
                 loss="normals_l1", metric="normals"),
        TaskSpec("edge", "binary_map", "nearest", 50.0, {"pascal_context": 1, "nyud": 1}, "odsF", True,
                 loss="balanced_bce", metric="edge", loss_kwargs={"pos_weight": 0.95}),
        TaskSpec("depth", "depth", "nearest", 1.0, {"nyud": 1}, "rmse", False,
                 loss="depth_l1", metric="depth"),
    )
}
# fmt: on

DATASET_TASKS: dict[str, tuple[str, ...]] = {
    "pascal_context": ("semseg", "human_parts", "sal", "normals", "edge"),
    "nyud": ("semseg", "depth", "normals", "edge"),
}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, with the valid names in the error."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task '{name}'; valid tasks: {sorted(TASKS)}") from None


def check_tasks(dataset: str, tasks: list[str] | tuple[str, ...]) -> None:
    """Raise a clear error if ``dataset`` is unknown or does not provide every task in ``tasks``."""
    if dataset not in DATASET_TASKS:
        raise ValueError(f"unknown dataset '{dataset}'; valid datasets: {sorted(DATASET_TASKS)}")
    missing = [t for t in tasks if t not in DATASET_TASKS[dataset]]
    if missing:
        raise ValueError(f"dataset '{dataset}' has no task(s) {missing}; it provides {list(DATASET_TASKS[dataset])}")
    if not tasks:
        raise ValueError("at least one task is required")


def loss_weights(tasks: Sequence[str], overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Effective loss weight per task: the registry default unless ``overrides`` names the task.

    Overriding a task that is not trained is an error, not a silent no-op, so a typo in a config
    cannot leave a weight at its default unnoticed.
    """
    specs = [get_task(t) for t in tasks]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(tasks))
    if unknown:
        raise ValueError(f"loss weight given for task(s) {unknown} that are not trained; tasks: {list(tasks)}")
    return {s.name: float(overrides.get(s.name, s.loss_weight)) for s in specs}


def task_settings(
    tasks: Sequence[str], dataset: str, weights_override: Mapping[str, float] | None = None
) -> dict[str, dict[str, Any]]:
    """The effective per-task settings as a plain (JSON/YAML-ready) dict, for configs and logs."""
    check_tasks(dataset, tasks)
    weights = loss_weights(tasks, weights_override)
    return {
        t: {
            "weight": weights[t],
            "ignore_index": spec.ignore_index,
            "num_outputs": spec.outputs_for(dataset),
            "target_kind": spec.target_kind,
            "loss": spec.loss,
            "loss_kwargs": dict(spec.loss_kwargs),
            "metric": spec.metric,
            "primary_metric": spec.primary_metric,
            "higher_is_better": spec.higher_is_better,
        }
        for t, spec in ((t, get_task(t)) for t in tasks)
    }
