"""The comparison report's arithmetic on hand-made run results: seeds grouped, one-task runs as the
single-task row, Δm against the right references, the Pareto front, the files' formats."""

from __future__ import annotations

import csv
import io
import json

import pytest

from mtlora_dist.study.compare import RunResult, compare, label_of
from mtlora_dist.study.pareto import pareto_front, plot_pareto
from mtlora_dist.tasks.delta_m import default_baselines, relative_change

TASKS = ["semseg", "normals"]


def run(label, seed, metrics, trainable, tasks=None, baselines=None, step_s=0.5, peak=100.0):
    return RunResult(
        run_dir=f"/runs/{label}__seed-{seed}",
        label=label,
        seed=seed,
        dataset="pascal_context",
        tasks=tasks or list(metrics),
        step=10,
        metrics={t: {"mIoU": v} if t == "semseg" else {"mean": v} for t, v in metrics.items()},
        trainable=trainable,
        total=10 * trainable,
        step_s=step_s,
        peak_memory_mb=peak,
        baselines=baselines,
    )


def test_labels_drop_only_the_seed():
    assert label_of("runs/sweeps/demo/method-lora__seed-1") == "lora"
    assert label_of("s3://b/x/seed-3__adapter-mtlora_r16/") == "adapter-mtlora_r16"
    assert label_of("runs/plain") == "plain"
    assert label_of("runs/sweep/seed-0") == "default"


def test_single_task_runs_make_the_references_and_one_row_summing_their_parameters():
    runs = [
        run("single", 0, {"semseg": 40.0}, 100, tasks=["semseg"]),
        run("single", 1, {"semseg": 42.0}, 100, tasks=["semseg"]),
        run("single-n", 0, {"normals": 20.0}, 90, tasks=["normals"]),
        run("single-n", 1, {"normals": 22.0}, 90, tasks=["normals"]),
        run("mtl", 0, {"semseg": 44.0, "normals": 21.0}, 50),
        run("mtl", 1, {"semseg": 46.0, "normals": 19.0}, 50),
    ]
    result = compare(runs)
    assert result.reference_source == "this comparison's single-task runs"
    assert result.references == {"semseg": 41.0, "normals": 21.0}
    rows = {r.label: r for r in result.rows}
    assert set(rows) == {"single_task", "mtl"}
    assert rows["single_task"].trainable == 190  # one model per task
    assert rows["single_task"].delta_m[0] == pytest.approx(
        (relative_change("semseg", 40, 41) + relative_change("normals", 20, 21)) / 2 / 2
        + (relative_change("semseg", 42, 41) + relative_change("normals", 22, 21)) / 2 / 2
    )
    seed0 = (relative_change("semseg", 44, 41) + relative_change("normals", 21, 21)) / 2
    seed1 = (relative_change("semseg", 46, 41) + relative_change("normals", 19, 21)) / 2
    assert rows["mtl"].delta_m[0] == pytest.approx((seed0 + seed1) / 2)
    assert rows["mtl"].delta_m[1] == pytest.approx(abs(seed0 - seed1) / 2**0.5)
    assert rows["mtl"].primary["semseg"] == pytest.approx((45.0, 2**0.5))
    assert [r.label for r in result.rows] == ["mtl", "single_task"]  # by trainable parameters


def test_without_single_task_runs_the_declared_then_the_registered_baselines():
    declared = compare([run("a", 0, {"semseg": 50.0, "normals": 18.0}, 5, baselines={"semseg": 40.0, "normals": 20.0})])
    assert declared.reference_source == "the runs' eval.baselines"
    assert declared.rows[0].delta_m[0] == pytest.approx((25.0 + 10.0) / 2)
    registered = compare([run("a", 0, {"semseg": 50.0, "normals": 18.0}, 5)])
    assert registered.references == default_baselines("pascal_context")


def test_files_hold_the_same_numbers():
    result = compare(
        [run("a", 0, {"semseg": 50.0, "normals": 18.0}, 5), run("a", 1, {"semseg": 52.0, "normals": 17.0}, 5)]
    )
    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert rows[0]["method"] == "a" and float(rows[0]["semseg_mIoU_mean"]) == pytest.approx(51.0)
    assert float(rows[0]["delta_m_mean"]) == pytest.approx(result.rows[0].delta_m[0])
    assert json.loads(result.to_json())["rows"][0]["trainable"] == 5
    assert "| a | 2 | 51.00 ± 1.41 |" in result.to_markdown()


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(10, 1.0), (5, 0.5), (20, 0.8), (5, 0.2), (100, 2.0), (50, 2.0)]
    assert pareto_front(points) == [1, 0, 5]


def test_the_plot_is_a_png():
    result = compare(
        [run("a", 0, {"semseg": 50.0, "normals": 18.0}, 5), run("b", 0, {"semseg": 40.0, "normals": 18.0}, 50)]
    )
    png = plot_pareto(result, paper=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_mean_that_rounds_to_zero_reads_plus_zero():
    from mtlora_dist.study.compare import _pm

    assert _pm(-1e-9, 3.07, signed=True) == "+0.00 ± 3.07" and _pm(-0.004, 0.0) == "0.00"
    assert _pm(-2.5, 1.0, signed=True) == "-2.50 ± 1.00"
