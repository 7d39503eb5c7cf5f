"""The comparison report over finished runs: per method, each task's primary metric (mean ± std over
seeds), Δm, trainable parameters, step time and peak memory; as Markdown, CSV and JSON, plus the Pareto
plot of Δm against trainable parameters (``pareto.py``).

Runs are grouped by their label (a sweep point's name less its ``seed-`` part; any other run folder by its
own name less that part). One-task runs are single-task models: together they make one row, the paper's
"single-task full fine-tuning (N models)", whose trainable count is their sum.

Δm references, first found wins: the single-task runs among the compared ones (the mean over their seeds
of each task's final primary metric: no number typed by hand), else the runs' own ``eval.baselines``,
else the dataset's registered single-task numbers (the paper's for PASCAL-Context).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import yaml

from mtlora_dist.storage.fs import StorageOptions, join, url_to_fs

__all__ = ["RunResult", "MethodRow", "Comparison", "read_run", "compare", "SINGLE_TASK_LABEL"]

SINGLE_TASK_LABEL = "single_task"
_SEED = re.compile(r"(^|__)seed-[^_]*(?=__|$)")


@dataclass
class RunResult:
    """What the report needs from one run folder."""

    run_dir: str
    label: str
    seed: int
    dataset: str
    tasks: list[str]
    step: int
    metrics: dict[str, dict[str, float]]  # task -> metric -> value, at the last evaluation
    trainable: int
    total: int
    step_s: float | None
    peak_memory_mb: float | None
    baselines: dict[str, float] | None  # the run's eval.baselines


@dataclass
class MethodRow:
    label: str
    runs: int
    seeds: list[int]
    tasks: list[str]
    primary: dict[str, tuple[float, float]]  # task -> (mean, std) of its primary metric
    delta_m: tuple[float, float] | None  # (mean, std) over seeds
    trainable: int
    step_s: float | None
    peak_memory_mb: float | None


@dataclass
class Comparison:
    rows: list[MethodRow]
    references: dict[str, float]
    reference_source: str
    primary_metric: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def to_csv(self) -> str:
        buf = io.StringIO()
        tasks = list(self.primary_metric)
        writer = csv.writer(buf)
        head = ["method", "runs", "seeds"]
        head += [f"{t}_{self.primary_metric[t]}_{s}" for t in tasks for s in ("mean", "std")]
        head += ["delta_m_mean", "delta_m_std", "trainable", "step_s", "peak_memory_mb"]
        writer.writerow(head)
        for row in self.rows:
            cells = [row.label, row.runs, " ".join(map(str, row.seeds))]
            for t in tasks:
                cells += list(row.primary.get(t, ("", "")))
            cells += list(row.delta_m or ("", ""))
            cells += [row.trainable, "" if row.step_s is None else row.step_s, row.peak_memory_mb or ""]
            writer.writerow(cells)
        return buf.getvalue()

    def to_markdown(self) -> str:
        tasks = list(self.primary_metric)
        head = ["method", "seeds"] + [f"{t} {self.primary_metric[t]}" for t in tasks]
        head += ["Δm %", "trainable", "step s", "peak MB"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = [row.label, str(len(row.seeds))]
            cells += [_pm(*row.primary[t]) if t in row.primary else "" for t in tasks]
            cells += [_pm(*row.delta_m, signed=True) if row.delta_m else "", f"{row.trainable:,}"]
            cells += [
                f"{row.step_s:.3f}" if row.step_s else "",
                f"{row.peak_memory_mb:,.0f}" if row.peak_memory_mb else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        refs = ", ".join(f"{t} {v:.2f}" for t, v in self.references.items())
        lines += ["", f"Δm references ({self.reference_source}): {refs or 'none'}"]
        return "\n".join(lines) + "\n"


def _pm(mean: float, std: float, signed: bool = False) -> str:
    mean = round(mean, 2) + 0.0  # a mean that rounds to zero prints as 0.00, never -0.00
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text if std == 0 else f"{text} ± {std:.2f}"


def label_of(run_dir: str) -> str:
    """A run's method label: its folder name less the ``seed-`` part and a leading ``method-``
    (``method-lora__seed-1`` -> ``lora``)."""
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    label = _SEED.sub("", name).strip("_") or "default"  # a sweep over seeds only: the recipe itself
    return label.removeprefix("method-")  # method-lora__... reads lora__...


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def _parameter_counts(run_dir: str) -> tuple[int, int]:
    """Trainable and total parameters of the run's model, built from its saved config on the meta device."""
    import torch

    from mtlora_dist.config import run_config
    from mtlora_dist.models import build_model
    from mtlora_dist.models.params import parameter_report

    cfg = run_config(run_dir)
    cfg.model.pretrained = None
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    report = parameter_report(model)
    return report["trainable"], report["total"]


def read_run(run_dir: str, storage: StorageOptions | None = None) -> RunResult:
    """The final evaluation, counts, step time and peak memory of the run in ``run_dir`` (local or s3://)."""
    from mtlora_dist.reports.curves import read_metrics

    fs, path = url_to_fs(join(run_dir, "config.yaml"), storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a run folder (pass run folders or a sweep folder)")
    raw = yaml.safe_load(fs.cat_file(path).decode())
    records = read_metrics(join(run_dir, "metrics.jsonl"), storage)
    evals = [r for r in records if r.get("split") == "val" and r.get("tasks")]
    if not evals:
        raise ValueError(f"{run_dir} has no evaluation in metrics.jsonl yet: let it finish (or evaluate it) first")
    last = max(evals, key=lambda r: r["step"])
    train = [r for r in records if r.get("split") == "train"]
    steps = [r["step_s"] for r in train if r.get("step_s")]
    peaks = [r["peak_memory_mb"] for r in train if r.get("peak_memory_mb")]
    trainable, total = _parameter_counts(run_dir)
    data = raw.get("data", {})
    return RunResult(
        run_dir=run_dir,
        label=label_of(run_dir),
        seed=int(raw.get("seed", 0)),
        dataset=data.get("dataset", ""),
        tasks=list(data.get("tasks", [])),
        step=int(last["step"]),
        metrics=last["tasks"],
        trainable=trainable,
        total=total,
        step_s=statistics.median(steps) if steps else None,
        peak_memory_mb=max(peaks) if peaks else None,
        baselines=(raw.get("eval") or {}).get("baselines"),
    )


def _references(runs: Sequence[RunResult], primary: dict[str, str]) -> tuple[dict[str, float], str]:
    from mtlora_dist.tasks.delta_m import default_baselines

    single: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        if len(run.tasks) == 1 and run.tasks[0] in run.metrics:
            task = run.tasks[0]
            single[task].append(run.metrics[task][primary[task]])
    if single:
        return {t: statistics.fmean(v) for t, v in single.items()}, "this comparison's single-task runs"
    declared = next((r.baselines for r in runs if r.baselines), None)
    if declared:
        return dict(declared), "the runs' eval.baselines"
    return default_baselines(runs[0].dataset), f"the registered single-task numbers of {runs[0].dataset}"


def _delta_m(metrics: dict[str, dict[str, float]], refs: dict[str, float], primary: dict[str, str]) -> float | None:
    from mtlora_dist.tasks.delta_m import relative_change

    changes = [relative_change(t, metrics[t][primary[t]], refs[t]) for t in metrics if t in refs and t in primary]
    return statistics.fmean(changes) if changes else None


def compare(runs: Iterable[RunResult]) -> Comparison:
    """Group ``runs`` into method rows (one-task runs into the single-task row) and compute Δm."""
    from mtlora_dist.tasks.registry import get_task

    runs = list(runs)
    if not runs:
        raise ValueError("no runs to compare")
    tasks = list(dict.fromkeys(t for r in runs for t in r.tasks))
    primary = {t: get_task(t).primary_metric for t in tasks}
    refs, source = _references(runs, primary)
    groups: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[SINGLE_TASK_LABEL if len(run.tasks) == 1 and len(tasks) > 1 else run.label].append(run)
    rows = [_row(label, group, refs, primary) for label, group in groups.items()]
    rows.sort(key=lambda r: r.trainable)
    return Comparison(rows, refs, source, primary)


def _row(label: str, runs: list[RunResult], refs: dict[str, float], primary: dict[str, str]) -> MethodRow:
    by_seed: dict[int, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_seed[run.seed].append(run)
    per_seed_metrics = {}
    for seed, seed_runs in by_seed.items():  # one-task runs of a seed together make one multi-task result
        merged: dict[str, dict[str, float]] = {}
        for run in seed_runs:
            merged.update(run.metrics)
        per_seed_metrics[seed] = merged
    tasks = list(dict.fromkeys(t for r in runs for t in r.tasks))
    primary_stats = {}
    for task in tasks:
        values = [m[task][primary[task]] for m in per_seed_metrics.values() if task in m]
        if values:
            primary_stats[task] = _mean_std(values)
    deltas = [d for m in per_seed_metrics.values() if (d := _delta_m(m, refs, primary)) is not None]
    one_seed = by_seed[min(by_seed)]
    steps = [r.step_s for r in runs if r.step_s]
    peaks = [r.peak_memory_mb for r in runs if r.peak_memory_mb]
    return MethodRow(
        label=label,
        runs=len(runs),
        seeds=sorted(by_seed),
        tasks=tasks,
        primary=primary_stats,
        delta_m=_mean_std(deltas) if deltas else None,
        trainable=sum(r.trainable for r in one_seed),  # the single-task row: one model per task
        step_s=statistics.fmean(steps) if steps else None,
        peak_memory_mb=max(peaks) if peaks else None,
    )


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
