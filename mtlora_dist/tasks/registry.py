"""The one place that says what each dense task is.

A task is data, not a branch: how its target is stored and resized, its loss weight, its ignore value
and its metric all live in one :class:`TaskSpec`; what a dataset provides (its tasks, each one's head
width and class names) lives in one :class:`DatasetSpec`. Adding a task or a dataset is a new entry
here -- or a declared dataset format (``configs/data/*.yaml``, ``docs/data.md``) registered at run
time with :func:`register_dataset` -- not an ``if task == ...`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
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
    primary_metric: str
    higher_is_better: bool
    ignore_index: int = IGNORE_INDEX
    image_interpolation: str = field(default="bicubic")
    loss: str = field(kw_only=True)
    metric: str = field(kw_only=True)
    loss_kwargs: Mapping[str, Any] = field(default_factory=dict, kw_only=True)

    def outputs_for(self, dataset: str) -> int:
        """Prediction channels of this task on ``dataset``."""
        spec = get_dataset(dataset)
        if self.name not in spec.num_outputs:
            raise ValueError(
                f"task '{self.name}' is not defined for dataset '{dataset}'; it provides {list(spec.tasks)}"
            )
        return spec.num_outputs[self.name]


@dataclass(frozen=True)
class DatasetSpec:
    """What one dataset provides.

    Attributes:
        name: the dataset's key (``data.dataset``, the manifest's ``dataset``).
        num_outputs: prediction channels per task, in the dataset's task order (class maps differ
            between datasets).
        class_names: class names of class-map tasks (optional; tables and reports use them).
        baselines: single-task values of each task's primary metric, for Delta-m (optional).
    """

    name: str
    num_outputs: Mapping[str, int]
    class_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    baselines: Mapping[str, float] = field(default_factory=dict)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.num_outputs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (stored in export artifacts, so they rebuild without the config)."""
        return {
            "name": self.name,
            "num_outputs": dict(self.num_outputs),
            "class_names": {t: list(n) for t, n in self.class_names.items()},
            "baselines": dict(self.baselines),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetSpec:
        return cls(
            str(data["name"]),
            {str(t): int(n) for t, n in data["num_outputs"].items()},
            {str(t): tuple(n) for t, n in data.get("class_names", {}).items()},
            {str(t): float(v) for t, v in data.get("baselines", {}).items()},
        )


# A table, one task a row: left as written by the formatter.
# fmt: off
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("semseg", "class_map", "nearest", 1.0, "mIoU", True, loss="cross_entropy", metric="segmentation"),
        TaskSpec("human_parts", "class_map", "nearest", 2.0, "mIoU", True, loss="cross_entropy", metric="segmentation"),
        TaskSpec("sal", "binary_map", "nearest", 5.0, "mIoU", True,
                 loss="balanced_bce", metric="saliency"),  # pos_weight None: beta from the batch
        TaskSpec("normals", "normals", "normals", 10.0, "mean", False, loss="normals_l1", metric="normals"),
        TaskSpec("edge", "binary_map", "nearest", 50.0, "odsF", True,
                 loss="balanced_bce", metric="edge", loss_kwargs={"pos_weight": 0.95}),
        TaskSpec("depth", "depth", "nearest", 1.0, "rmse", False, loss="depth_l1", metric="depth"),
    )
}
# fmt: on

BUILTIN_TASKS: tuple[str, ...] = tuple(TASKS)  # declared datasets may register more at run time

# A task declared by a dataset format that the registry does not know is made from its kind's row.
KIND_DEFAULTS: dict[str, TaskSpec] = {
    spec.target_kind: spec for spec in (TASKS["semseg"], TASKS["sal"], TASKS["normals"], TASKS["depth"])
}

DATASETS: dict[str, DatasetSpec] = {
    "pascal_context": DatasetSpec(
        "pascal_context",
        {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1},
        # fully fine-tuned single-task Swin-T models, primary metric per task (paper Table 1, spec B §9.1)
        baselines={"semseg": 67.21, "human_parts": 61.93, "sal": 62.35, "normals": 17.97},
    ),
    "nyud": DatasetSpec("nyud", {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}),  # the paper has no baselines
}

BUILTIN_DATASETS: tuple[str, ...] = tuple(DATASETS)  # the rest are declared and registered at run time


class _DatasetTasks(Mapping[str, tuple[str, ...]]):
    """``DATASET_TASKS[name]``: the tasks of a registered dataset, read from ``DATASETS`` (one source)."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return DATASETS[name].tasks

    def __iter__(self) -> Iterator[str]:
        return iter(DATASETS)

    def __len__(self) -> int:
        return len(DATASETS)


DATASET_TASKS: Mapping[str, tuple[str, ...]] = _DatasetTasks()


def labeled_key(task: str) -> str:
    """The batch key of a bool (B,) tensor saying which samples carry a ``task`` label (partial labels)."""
    return f"labeled/{task}"


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, with the valid names in the error."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task '{name}'; valid tasks: {sorted(TASKS)}") from None


def get_dataset(name: str) -> DatasetSpec:
    """Look a dataset up by name, with the valid names and how to add one in the error."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset '{name}'; known datasets: {sorted(DATASETS)}. A dataset of your own is declared "
            "in a data config with a 'format:' section (configs/data/*.yaml, docs/data.md)"
        ) from None


def register_task(spec: TaskSpec) -> None:
    """Add a task; registering an identical spec again is a no-op, a different one under a used name an error."""
    known = TASKS.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"task '{spec.name}' is already registered with different settings: {known}")
    TASKS[spec.name] = spec


def register_dataset(spec: DatasetSpec, tasks: list[TaskSpec] | tuple[TaskSpec, ...] = ()) -> None:
    """Add a dataset (and tasks of its own); idempotent, so every process may register what its config
    declares. Every task of the dataset must be registered (here or before)."""
    for task in tasks:
        register_task(task)
    unknown = [t for t in spec.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"dataset '{spec.name}' names task(s) {unknown} that are not registered; give each a 'kind'")
    known = DATASETS.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(
            f"dataset '{spec.name}' is already registered with different settings ({known.to_dict()}); "
            "give the declared dataset a name of its own"
        )
    DATASETS[spec.name] = spec


def check_tasks(dataset: str, tasks: list[str] | tuple[str, ...]) -> None:
    """Raise a clear error if ``dataset`` is unknown or does not provide every task in ``tasks``."""
    get_dataset(dataset)
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
