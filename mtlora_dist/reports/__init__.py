"""What a run shows people: prediction grids, training curves, result tables (console, JSON, Markdown),
and the two jobs that make them (``training.TrainingReporter`` for a training run, ``eval_job`` for a
checkpoint).

See ``docs/evaluation.md``.
"""

from mtlora_dist.reports.colorize import colorize, label_map, voc_palette
from mtlora_dist.reports.curves import plot_curves, read_metrics, save_curves
from mtlora_dist.reports.files import save_png
from mtlora_dist.reports.grid import GridLayout, compose_grid, panel_size
from mtlora_dist.reports.predictions import PredictionReport
from mtlora_dist.reports.tables import markdown_table, write_results
from mtlora_dist.reports.training import TrainingReporter

__all__ = [
    "GridLayout",
    "PredictionReport",
    "colorize",
    "compose_grid",
    "label_map",
    "markdown_table",
    "panel_size",
    "plot_curves",
    "read_metrics",
    "save_curves",
    "save_png",
    "TrainingReporter",
    "voc_palette",
    "write_results",
]
