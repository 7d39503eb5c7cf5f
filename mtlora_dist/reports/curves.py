"""Training curves from a run's ``metrics.jsonl``: loss per task, and each task's primary metric and Δm
at every evaluation, as one PNG.

A resumed run may log a step twice (the steps after its last checkpoint); the last record of a step wins.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from mtlora_dist.reports.files import save_png
from mtlora_dist.storage.fs import StorageOptions, url_to_fs
from mtlora_dist.tasks.registry import get_task

__all__ = ["plot_curves", "read_metrics", "save_curves"]

COLUMNS = 3


def read_metrics(url: str, storage: StorageOptions | None = None) -> list[dict]:
    """The records of a ``metrics.jsonl`` (local or remote); ``[]`` if there is none yet."""
    fs, path = url_to_fs(url, storage)
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _by_step(records: Iterable[dict], split: str) -> list[dict]:
    last = {int(r["step"]): r for r in records if r.get("split") == split}
    return [last[s] for s in sorted(last)]


def _series(records: list[dict], value) -> tuple[list[int], list[float]]:
    points = [(r["step"], value(r)) for r in records]
    points = [(s, v) for s, v in points if isinstance(v, (int, float)) and math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def plot_curves(records: list[dict]) -> Image.Image | None:
    """The figure as an image, or ``None`` when there is nothing to plot."""
    train, val = _by_step(records, "train"), _by_step(records, "val")
    if not train and not val:
        return None
    tasks = list(dict.fromkeys([t for r in train for t in r.get("losses", {})] + [t for r in val for t in r["tasks"]]))
    val_tasks = [t for t in tasks if any(t in r["tasks"] for r in val)]
    panels = 1 + len(val_tasks) + (1 if any(r.get("delta_m") is not None for r in val) else 0)
    rows = math.ceil(panels / COLUMNS)
    fig = Figure(figsize=(4.2 * min(panels, COLUMNS), 3.2 * rows), dpi=100)
    canvas = FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, min(panels, COLUMNS), i + 1) for i in range(panels)]

    loss_ax = axes[0]
    for task in tasks:
        loss_ax.plot(*_series(train, lambda r, t=task: r.get("losses", {}).get(t)), label=task)
    # the total on top and dashed: with one task (or one dominant loss) it would hide under that line
    loss_ax.plot(*_series(train, lambda r: r.get("loss")), color="black", linestyle="--", zorder=3, label="total")
    if all(v > 0 for line in loss_ax.get_lines() for v in line.get_ydata()):
        loss_ax.set_yscale("log")
    loss_ax.set(title="training loss", xlabel="step")
    loss_ax.legend(fontsize=7, framealpha=0.6)

    for ax, task in zip(axes[1:], val_tasks):
        spec = get_task(task)
        ax.plot(*_series(val, lambda r, t=task, m=spec.primary_metric: r["tasks"].get(t, {}).get(m)), marker="o")
        ax.set(
            title=f"{task} {spec.primary_metric} ({'higher' if spec.higher_is_better else 'lower'} is better)",
            xlabel="step",
        )
    if panels > 1 + len(val_tasks):
        axes[-1].plot(*_series(val, lambda r: r.get("delta_m")), marker="o", color="tab:red")
        axes[-1].axhline(0.0, color="grey", linewidth=0.8)
        axes[-1].set(title="delta-m % (higher is better)", xlabel="step")
    last_step = max(int(r["step"]) for r in train + val)
    for ax in axes:
        ax.set_xlim(0, last_step * 1.02 + 1)  # one time axis for all panels
        ax.grid(alpha=0.3)
    fig.tight_layout()
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def save_curves(metrics_url: str, out_url: str, storage: StorageOptions | None = None) -> str | None:
    """Plot ``metrics_url`` into the PNG ``out_url``; returns a local copy's path (``None``: no records)."""
    image = plot_curves(read_metrics(metrics_url, storage))
    return None if image is None else save_png(image, out_url, storage)
