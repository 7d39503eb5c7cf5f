"""Small output details (issue 26 item 15): launch/eval.py says what its val loader is once, and the total
loss in curves.png stays visible when a task's loss lies on it."""

from __future__ import annotations

import numpy as np

from mtlora_dist.reports.curves import plot_curves

from evaltest_utils import run_script


def test_eval_prints_the_val_loader_line_once(trained_run):
    proc = run_script("eval.py", [f"checkpoint={trained_run.run_dir}", "eval.visual_samples=2"], trained_run.workdir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if "val loader, rank 0" in x]
    assert len(lines) == 1, lines


def _dark_pixels(records: list[dict]) -> int:
    image = np.asarray(plot_curves(records).convert("RGB")).astype(int)
    return int((image.max(axis=2) < 60).sum())


def test_the_total_loss_is_not_hidden_under_a_tasks_loss():
    """One task: the total equals its loss. The black total line must add visible pixels over the task's."""
    steps = range(1, 41)
    with_total = [{"step": s, "split": "train", "loss": 5.0 / s, "losses": {"semseg": 5.0 / s}} for s in steps]
    without = [{k: v for k, v in r.items() if k != "loss"} for r in with_total]
    assert _dark_pixels(with_total) - _dark_pixels(without) > 300  # a line across the panel, not a legend swatch
