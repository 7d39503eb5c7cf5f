"""A sweep: a recipe, overrides shared by every point, and grids whose product makes the points.

Sweep values use Hydra's own override grammar (``method=mtlora,full_ft``, ``seed=range(0,3)``,
``data.tasks=[semseg],[sal]``), parsed by Hydra's ``OverridesParser``, so what a multirun would accept
is what a sweep accepts. A sweep may hold several grids (their points are united), because the paper's
table is not one product: single-task models are one run per task, the other methods one run for all.

Each point gets a stable name made of its swept values (``method=full_ft__seed=1``), which is its
run_dir under the sweep folder: running the sweep again finds the same folders, skips the points that
finished and resumes the others from their newest checkpoint.

No torch here: a sweep is checked (every point's config composed and validated) in seconds.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from mtlora_dist.config import PACKAGE_CONFIGS, ConfigError, refuse_secret_overrides

__all__ = ["Point", "SweepSpec", "expand", "point_name", "load_preset", "spec_yaml", "PRESETS"]

PRESETS = os.path.join(PACKAGE_CONFIGS, "sweep")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its name (= its folder) and every override it is trained with."""

    name: str
    swept: tuple[tuple[str, str], ...]  # (key, value) of the swept keys, in grid order
    overrides: tuple[str, ...]  # the shared overrides, then the swept ones

    @property
    def values(self) -> dict[str, str]:
        return dict(self.swept)


@dataclass
class SweepSpec:
    """What to run: ``config`` (a recipe name under configs/ or a YAML path), ``overrides`` shared by every
    point, and ``grids``: each a list of sweep overrides in Hydra's grammar (``key=a,b``) or plain ones."""

    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    grids: list[list[str]] = field(default_factory=list)
    slurm: dict[str, object] = field(default_factory=dict)  # submitit executor settings of a preset
    local_jobs: int = 1  # points trained at once by a local sweep (the CPUs are split between them)

    def config_path(self) -> str | None:
        """The recipe's YAML path: a name is looked up under configs/."""
        if self.config is None or os.path.isfile(self.config):
            return self.config
        candidate = os.path.join(PACKAGE_CONFIGS, f"{self.config}.yaml")
        if os.path.isfile(candidate):
            return candidate
        raise ConfigError(
            f"sweep config '{self.config}' is neither a file nor a recipe under configs/ (e.g. quickstart)"
        )


def point_name(swept: Iterable[tuple[str, str]]) -> str:
    """``method-full_ft__seed-1``: the swept values, safe as a folder or object name and as a Hydra override
    value (no ``=``; brackets, commas and slashes go: ``data.tasks=[semseg,sal]`` becomes ``data.tasks-semseg+sal``)."""
    parts = []
    for key, value in swept:
        value = value.strip("[]").replace(",", "+")
        parts.append(_UNSAFE.sub("-", f"{key}-{value}").strip("-"))
    return "__".join(parts) or "default"


def _grid_points(grid: list[str]) -> Iterable[tuple[tuple[str, str], ...]]:
    parsed = OverridesParser.create().parse_overrides(grid)
    axes = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            axes.append([(key, value) for value in override.sweep_string_iterator()])
        else:  # a plain key=value inside a grid: part of every point of this grid, and of its name
            axes.append([(key, override.get_value_element_as_str())])
    return itertools.product(*axes)


def expand(spec: SweepSpec) -> list[Point]:
    """Every point of the sweep, grids united in order, duplicates (same name) once."""
    refuse_secret_overrides(list(spec.overrides) + [o for grid in spec.grids for o in grid])
    points: dict[str, Point] = {}
    for grid in spec.grids or [[]]:
        for swept in _grid_points(grid):
            name = point_name(swept)
            overrides = tuple(spec.overrides) + tuple(f"{k}={v}" for k, v in swept)
            refuse_secret_overrides(list(overrides))  # each value as the point will pass it
            points.setdefault(name, Point(name, tuple(swept), overrides))
    return list(points.values())


def _as_grid(grid: Mapping[str, object] | list[str]) -> list[str]:
    """A preset grid as Hydra sweep overrides: ``{seed: [0, 1]}`` -> ``["seed=0,1"]``."""
    if isinstance(grid, list):
        return [str(item) for item in grid]
    out = []
    for key, values in grid.items():
        values = values if isinstance(values, list) else [values]
        out.append(f"{key}=" + ",".join(_value_text(v) for v in values))
    return out


def _value_text(value: object) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


_PRESET_KEYS = ("config", "overrides", "grid", "slurm", "local_jobs")


def load_preset(name_or_path: str) -> SweepSpec:
    """A sweep preset: ``configs/sweep/<name>.yaml`` or a path, with keys ``config``, ``overrides``,
    ``grid`` (one mapping key -> values, or a list of them) and optionally ``slurm`` and ``local_jobs``."""
    path = name_or_path if os.path.isfile(name_or_path) else os.path.join(PRESETS, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(PRESETS) if f.endswith(".yaml")) if os.path.isdir(PRESETS) else []
        raise ConfigError(f"sweep preset '{name_or_path}' not found: pass a YAML path or one of {', '.join(known)}")
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    unknown = set(raw) - set(_PRESET_KEYS)
    if unknown:
        raise ConfigError(f"sweep preset {path}: unknown key(s) {sorted(unknown)}; use {', '.join(_PRESET_KEYS)}")
    local_jobs = raw.get("local_jobs", 1)
    if not isinstance(local_jobs, int) or local_jobs < 1:
        raise ConfigError(f"sweep preset {path}: local_jobs is {local_jobs!r}; expected a whole number of 1 or more")
    grids = raw.get("grid") or []
    return SweepSpec(
        config=raw.get("config"),
        overrides=[str(o) for o in raw.get("overrides") or []],
        grids=[_as_grid(grids)] if isinstance(grids, dict) else [_as_grid(g) for g in grids if g],
        slurm=dict(raw.get("slurm") or {}),
        local_jobs=local_jobs,
    )


def spec_yaml(spec: SweepSpec) -> str:
    """``spec`` in the preset format (what ``<sweep_dir>/sweep.yaml`` holds, read back by :func:`load_preset`)."""
    raw = {"config": spec.config, "overrides": spec.overrides, "grid": spec.grids, "slurm": spec.slurm,
           "local_jobs": spec.local_jobs}  # fmt: skip
    return yaml.safe_dump(raw, sort_keys=False)
