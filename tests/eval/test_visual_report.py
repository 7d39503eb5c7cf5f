"""Reports: the prediction grid (size and panels), colours by target kind, training curves, Markdown table."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mtlora_dist.config import run_config
from mtlora_dist.engine.restore import resolve_checkpoint, restore_model
from mtlora_dist.reports import (
    GridLayout,
    PredictionReport,
    colorize,
    compose_grid,
    markdown_table,
    panel_size,
    plot_curves,
    save_curves,
    voc_palette,
)
from mtlora_dist.reports.grid import GAP, HEADER, PANEL_SIDE
from mtlora_dist.storage.fs import url_to_fs

TASKS = ["semseg", "human_parts", "sal", "normals"]


def _expected_grid_size(rows: int, tasks: int, img_size=(64, 64)) -> tuple[int, int]:
    """The design: input + (truth, prediction) per task, panels with the long side PANEL_SIDE, GAP between."""
    cols = 1 + 2 * tasks
    ph, pw = panel_size(img_size)
    return cols * pw + (cols + 1) * GAP, HEADER + rows * ph + (rows + 1) * GAP


def test_grid_layout_places_every_panel():
    layout = GridLayout(rows=2, cols=3, panel_h=10, panel_w=20)
    assert layout.size == (3 * 20 + 4 * GAP, HEADER + 2 * 10 + 3 * GAP)
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(9, 9, 9), (99, 99, 99), (199, 199, 199)]]
    panels = [[np.full((5, 5, 3), c, np.uint8) for c in row] for row in colours]
    image = np.asarray(compose_grid(panels, ["a", "b", "c"], layout))
    assert image.shape == (layout.size[1], layout.size[0], 3)
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            x, y = layout.origin(r, c)
            assert (image[y : y + 10, x : x + 20] == colour).all()  # the whole panel, resized
            assert (image[y - 1, x : x + 20] == 255).all()  # white gap above it
    assert panel_size((448, 336)) == (PANEL_SIDE, 120) and panel_size((64, 64)) == (PANEL_SIDE, PANEL_SIDE)


@pytest.mark.integration
def test_training_wrote_the_prediction_grid_and_the_curves_to_the_run_dir(trained_run):
    fs, base = url_to_fs(f"{trained_run.run_dir}/reports")
    grid = Image.open(io.BytesIO(fs.cat_file(f"{base}/predictions_step_00000006.png")))
    assert grid.size == _expected_grid_size(rows=2, tasks=len(TASKS))  # eval.visual_samples=2
    curves = Image.open(io.BytesIO(fs.cat_file(f"{base}/curves.png")))
    assert curves.size[0] > 600 and curves.size[1] > 300


@pytest.mark.integration
def test_prediction_report_draws_input_truth_and_prediction(trained_run, tmp_path):
    cfg = run_config(trained_run.run_dir, None, ["eval.visual_samples=3"])
    model = restore_model(cfg, resolve_checkpoint(trained_run.run_dir))
    report = PredictionReport.from_config(cfg, cfg.data.val_url)
    rng = torch.get_rng_state()
    url = report.write(model, 6, str(tmp_path), torch.device("cpu"), torch.float32)
    assert torch.equal(rng, torch.get_rng_state()), "the report must not move the training RNG"
    assert url == f"{tmp_path}/predictions_step_00000006.png"
    image = np.asarray(Image.open(url).convert("RGB"))
    assert (image.shape[1], image.shape[0]) == _expected_grid_size(rows=3, tasks=len(TASKS))

    layout = GridLayout(3, 1 + 2 * len(TASKS), *panel_size(cfg.model.img_size))
    samples = report.samples()
    for row in range(3):  # column 0 is the input image, upscaled 64 -> 160 px
        x, y = layout.origin(row, 0)
        shown = image[y : y + layout.panel_h, x : x + layout.panel_w].astype(float).mean((0, 1))
        assert np.allclose(shown, samples["image"][row].float().mean((1, 2)).numpy(), atol=3)
        x, y = layout.origin(row, 1)  # semseg truth: palette colours only (nearest resize), or the ignore checker
        colours = {tuple(c) for c in image[y : y + layout.panel_h, x : x + layout.panel_w].reshape(-1, 3)}
        assert colours <= {tuple(c) for c in voc_palette()} | {(255, 255, 255), (200, 200, 200)}
    assert PredictionReport.from_config(run_config(trained_run.run_dir, None, ["eval.visual_samples=0"]), "x") is None


def test_colours_by_target_kind():
    ids = np.array([[0, 1], [15, 255]], np.uint8)
    rgb = colorize("semseg", ids, ignore=ids == 255)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [128, 0, 0]  # VOC: background, aeroplane
    assert rgb[1, 0].tolist() == [192, 128, 128]  # person
    assert rgb[1, 1].tolist() in ([255] * 3, [200] * 3)  # ignore: checkerboard
    normals = np.array([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]], np.float32)
    assert colorize("normals", normals).tolist() == [[[127, 127, 255], [255, 127, 127]]]
    heat = colorize("sal", np.array([[0.0, 1.0]], np.float32))
    assert heat[0, 0].sum() < 30 and heat[0, 1].sum() > 600  # inferno: black -> pale yellow
    depth = colorize("depth", np.array([[1.0, 5.0, 9.0]], np.float32), value_range=(1.0, 9.0))
    assert not np.array_equal(depth[0, 0], depth[0, 2])


def test_curves_take_the_last_record_of_a_step(tmp_path):
    records = [
        {"step": s, "split": "train", "loss": 10.0 / s, "losses": {"semseg": 3.0 / s, "sal": 1.0 / s}}
        for s in (1, 2, 3, 2)
    ]  # step 2 logged again after a resume
    records += [{"step": 3, "split": "val", "delta_m": -5.0, "tasks": {"semseg": {"mIoU": 4.0}, "sal": {"mIoU": 30.0}}}]
    image = plot_curves(records)
    assert image is not None and image.size[0] >= 3 * 400  # loss, semseg, sal, delta-m: two rows of three
    assert plot_curves([]) is None
    assert save_curves(str(tmp_path / "none.jsonl"), str(tmp_path / "curves.png")) is None


def test_markdown_table():
    report = {
        "checkpoint": "s3://b/run/checkpoints/step_00000010",
        "step": 10,
        "split": "val",
        "dataset": "pascal_context",
        "protocol": "official",
        "delta_m": 1.234,
        "tasks": {
            "semseg": {
                "metrics": {"mIoU": 70.0, "pixel_acc": 90.0},
                "primary_metric": "mIoU",
                "higher_is_better": True,
                "baseline": 67.21,
                "relative_change": 4.15,
                "in_delta_m": True,
            },
            "edge": {
                "metrics": {"odsF": 50.0},
                "primary_metric": "odsF",
                "higher_is_better": True,
                "baseline": None,
                "relative_change": None,
                "in_delta_m": False,
            },
        },
    }
    text = markdown_table(report)
    assert "| semseg | **mIoU** | higher | **70.00** | 67.21 | +4.15 |" in text
    assert "| semseg | pixel_acc |  | 90.00 |  |  |" in text
    assert "| edge | **odsF** | higher | **50.00** | not in Δm |  |" in text
    assert "**Δm: +1.23 %** over semseg" in text and "protocol: official" in text


@pytest.mark.parametrize("bad", [[[np.zeros((2, 2, 3), np.uint8)]]])
def test_grid_refuses_a_wrong_number_of_panels(bad):
    with pytest.raises(ValueError, match="expected 1 rows of 2 panels"):
        compose_grid(bad, ["a", "b"], GridLayout(1, 2, 4, 4))
