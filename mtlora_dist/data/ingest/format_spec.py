"""A dataset declared in a data config instead of written as a reader: where each sample's files are and
what each task's label means (``docs/data.md``).

::

    # configs/data/my_dataset.yaml
    dataset: my_dataset
    tasks: [semseg, road, height]
    format:
      image: images/{split}/{scene}/{frame}.jpg      # {split} is the converted split; other {fields} name a sample
      tasks:
        semseg: {kind: class_map, file: labels/{split}/{scene}/{frame}.png, num_classes: 19, ignore_value: 255}
        road:   {kind: binary_map, file: road/{split}/{scene}/{frame}.png}
        height: {kind: scalar, file: height/{split}/{scene}/{frame}.png, units: m, scale: 0.001, invalid_value: 0}

This module is the schema only (torch- and numpy-free: it is part of the run config, checked before
torch loads) plus :func:`register_format`, which turns a declaration into registry entries so the
model, losses, metrics and reports treat the dataset like a built-in one. The reader is
``data/ingest/formats/declared.py``; label decoders are registry entries in ``data/ingest/formats/decoders.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from mtlora_dist.choices import StrEnum
from mtlora_dist.tasks.registry import BUILTIN_DATASETS, KIND_DEFAULTS, TASKS, DatasetSpec, TaskSpec, register_dataset

__all__ = ["LabelKind", "LabelFormat", "DatasetFormat", "FIELD", "KIND_TARGET", "pattern_fields", "register_format"]


class LabelKind(StrEnum):
    class_map = "class_map"  # ids of K classes (+ an ignore value)
    binary_map = "binary_map"  # a mask: positive where the stored value is above a threshold
    unit_vector = "unit_vector"  # a direction per pixel (surface normals)
    scalar = "scalar"  # a measurement per pixel in some unit (depth); 0 after decoding = none


# the registry's target kind (storage, resizing, loss and metric family) of each declared kind
KIND_TARGET = {"class_map": "class_map", "binary_map": "binary_map", "unit_vector": "normals", "scalar": "depth"}
_FIXED_OUTPUTS = {"binary_map": 1, "unit_vector": 3, "scalar": 1}
FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # a {field} of a path pattern


@dataclass
class LabelFormat:
    """How one task's label is stored on disk and what its values mean.

    ``file`` is a path pattern relative to the dataset root using the image pattern's ``{fields}``.
    ``decoder`` names an entry of ``data.formats.decoders.DECODERS`` (default: the kind's own),
    given ``decoder_args``. ``optional``: a sample whose file is missing has no label for this task
    (partial labels: zero loss, skipped by the metrics) instead of failing the conversion.
    """

    kind: LabelKind = LabelKind.class_map
    file: str = ""
    decoder: str | None = None
    decoder_args: dict[str, Any] = field(default_factory=dict)
    optional: bool = False
    num_classes: int | None = None  # class_map: K (ids 0..K-1 after id_map)
    ignore_value: int | None = None  # class_map / binary_map: stored value of unlabelled pixels
    id_map: dict[int, int] | None = None  # class_map: stored id -> class id; ids not listed become ignore
    class_names: list[str] | None = None  # class_map: K names, for tables and reports
    positive_above: float = 0.5  # binary_map: positive where stored / dtype max > this
    units: str | None = None  # scalar: what one unit of the decoded value is (e.g. m)
    scale: float = 1.0  # scalar: decoded value = stored value * scale
    invalid_value: float | None = None  # scalar: stored value of pixels without a measurement

    def num_outputs(self) -> int:
        if self.kind == LabelKind.class_map:
            return int(self.num_classes or 0)
        return _FIXED_OUTPUTS[str(self.kind)]


@dataclass
class DatasetFormat:
    """A dataset on disk: the image pattern, how splits are chosen, and one :class:`LabelFormat` per task.

    ``split_file`` (optional, may use ``{split}``): a text file listing, one per line, the values of the
    image pattern's first field that belong to the split (sample ids for a flat dataset, buildings for
    Taskonomy); without it, a split is every image the pattern matches with ``{split}`` filled in.
    ``baselines``: single-task values of each task's primary metric, for Delta-m.
    """

    image: str = ""
    tasks: dict[str, LabelFormat] = field(default_factory=dict)
    split_file: str | None = None
    baselines: dict[str, float] = field(default_factory=dict)

    def sample_fields(self) -> list[str]:
        """The fields that name a sample, in the image pattern's order (``split`` excluded)."""
        return [f for f in pattern_fields(self.image) if f != "split"]


def pattern_fields(pattern: str) -> list[str]:
    """The ``{field}`` names of a path pattern, in order, each once."""
    seen: list[str] = []
    for name in FIELD.findall(pattern):
        if name not in seen:
            seen.append(name)
    return seen


def check_format(name: str, fmt: DatasetFormat) -> None:
    """Raise ``ValueError`` naming the key and the fix for a declaration that cannot work."""
    where = f"data.format of dataset '{name}'"
    if not fmt.image:
        raise ValueError(f"{where}: 'image' is empty; give the image path pattern, e.g. images/{{split}}/{{id}}.jpg")
    if not fmt.sample_fields():
        raise ValueError(f"{where}: image pattern '{fmt.image}' has no {{field}} naming a sample, e.g. {{id}}")
    if not fmt.tasks:
        raise ValueError(f"{where}: 'tasks' is empty; declare at least one task's label")
    known = set(pattern_fields(fmt.image)) | {"split"}
    for task, label in fmt.tasks.items():
        key = f"{where}: tasks.{task}"
        if not label.file and label.decoder is None:
            raise ValueError(f"{key}.file is empty; give the label's path pattern")
        extra = sorted(set(pattern_fields(label.file)) - known)
        if extra:
            raise ValueError(f"{key}.file uses field(s) {extra} that the image pattern '{fmt.image}' does not define")
        if label.kind == LabelKind.class_map:
            if not label.num_classes or label.num_classes < 1 or label.num_classes > 255:
                raise ValueError(f"{key}.num_classes must be 1..255 for a class_map, got {label.num_classes}")
            if label.class_names is not None and len(label.class_names) != label.num_classes:
                raise ValueError(
                    f"{key}.class_names lists {len(label.class_names)} names for {label.num_classes} classes"
                )
            bad = sorted(v for v in (label.id_map or {}).values() if not 0 <= v < label.num_classes and v != 255)
            if bad:
                raise ValueError(
                    f"{key}.id_map maps to class ids {bad} outside 0..{label.num_classes - 1} (255 = ignore)"
                )
        if label.kind == LabelKind.scalar and label.scale <= 0:
            raise ValueError(f"{key}.scale must be > 0, got {label.scale}")


def _task_spec(task: str, kind: str) -> TaskSpec:
    """The registry entry of a declared task: the registered one (whose kind must agree), or a new one
    made from the kind's defaults (loss, metric, primary metric) with loss weight 1."""
    target = KIND_TARGET[kind]
    known = TASKS.get(task)
    if known is not None:
        if known.target_kind != target:
            raise ValueError(
                f"task '{task}' is registered as a {known.target_kind} task but is declared as kind '{kind}'; "
                "use the matching kind, or give the task another name"
            )
        return known
    return replace(KIND_DEFAULTS[target], name=task, loss_weight=1.0)


def register_format(name: str, fmt: DatasetFormat) -> DatasetSpec:
    """Check ``fmt`` and register dataset ``name`` (and tasks of its own) so every part of the framework
    knows it. Idempotent: each process (rank, evaluation job) registers what its config declares."""
    if name in BUILTIN_DATASETS:
        raise ValueError(
            f"'{name}' is a built-in dataset with its own reader; give the declared dataset another name "
            "(data.dataset=...)"
        )
    check_format(name, fmt)
    tasks = [_task_spec(t, str(label.kind)) for t, label in fmt.tasks.items()]
    spec = DatasetSpec(
        name,
        {t: label.num_outputs() for t, label in fmt.tasks.items()},
        {t: tuple(label.class_names) for t, label in fmt.tasks.items() if label.class_names},
        dict(fmt.baselines),
    )
    register_dataset(spec, tasks)
    return spec
