"""Delta-m: the mean relative gain of a multi-task model over single-task baselines (Part B §6).

``Delta-m = (100 / T) * sum_t s_t * (M_t - S_t) / S_t`` over the T tasks that have a baseline, with
``s_t = +1`` when the task's primary metric is higher-is-better and ``-1`` otherwise (both from the
registry). Tasks without a baseline are reported but left out of the mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mtlora_dist.tasks.registry import DATASETS, TASKS, get_dataset, get_task

__all__ = ["PAPER_BASELINES", "default_baselines", "delta_m", "relative_change"]

# Fully fine-tuned single-task Swin-T models, primary metric per task (paper Table 1, spec B §9.1).
PAPER_BASELINES: dict[str, dict[str, float]] = {"pascal_context": dict(DATASETS["pascal_context"].baselines)}


def default_baselines(dataset: str) -> dict[str, float]:
    """The dataset's registered single-task numbers: the paper's for PASCAL-Context, none for NYUD (the
    paper reports none), a declared dataset's own ``baselines``."""
    return dict(get_dataset(dataset).baselines)


def relative_change(task: str, value: float, baseline: float) -> float:
    """Signed change of ``value`` over ``baseline`` in percent, positive when it is an improvement."""
    if baseline == 0:
        raise ValueError(f"baseline of task '{task}' is 0; a relative change needs a non-zero baseline")
    sign = 1.0 if get_task(task).higher_is_better else -1.0
    return 100.0 * sign * (value - baseline) / baseline


def delta_m(
    results: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, float],
    tasks: Sequence[str] | None = None,
) -> float | None:
    """Delta-m in percent over ``tasks`` (default: every task in ``results``) that have a baseline.

    ``results`` maps task -> {metric: value}; each task's registry primary metric is compared with its
    baseline. Returns ``None`` if no task has a baseline.
    """
    tasks = [t for t in results if t in TASKS] if tasks is None else list(tasks)
    terms = []
    for task in (t for t in tasks if t in baselines):
        metric = get_task(task).primary_metric
        if task not in results or metric not in results[task]:
            raise KeyError(f"no '{metric}' result for task '{task}', which has a baseline; results: {dict(results)}")
        terms.append(relative_change(task, results[task][metric], baselines[task]))
    return sum(terms) / len(terms) if terms else None
