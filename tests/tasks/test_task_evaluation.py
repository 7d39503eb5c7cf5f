"""The evaluator: per-sample resize to the label's size, Delta-m, table and JSON."""

from __future__ import annotations

import json

import pytest
import torch

from mtlora_dist.tasks.evaluation import MultiTaskEvaluator, at_label_size

IGNORE = 255


def _half_planes(k: int, cls_left: int, cls_right: int, h: int = 4, w: int = 4) -> torch.Tensor:
    """(1, k, h, w) logits voting ``cls_left`` on the left half of the columns, ``cls_right`` on the right."""
    logits = torch.zeros(1, k, h, w)
    logits[0, cls_left, :, : w // 2] = 5.0
    logits[0, cls_right, :, w // 2 :] = 5.0
    return logits


def test_predictions_are_resized_to_each_label_size():
    # Sample 0: prediction 4x4 (left class 1, right class 0) -> resized to its 2x2 label, bilinear /2 keeps
    # the halves: pred [[1, 0], [1, 0]]; label [[1, 1], [0, 0]] padded with 255 to 3x3.
    #   class 0: TP 1 FP 1 FN 1 -> 1/3 ; class 1: TP 1 FP 1 FN 1 -> 1/3
    # Sample 1: its label is 3x3, all class 2, prediction all class 2 -> class 2 IoU 1
    # mIoU over the three present classes (1/3 + 1/3 + 1) / 3 = 5/9
    preds = torch.cat([_half_planes(3, 1, 0), _half_planes(3, 2, 2)])  # (2, 3, 4, 4)
    labels = torch.full((2, 3, 3), IGNORE, dtype=torch.uint8)
    labels[0, :2, :2] = torch.tensor([[1, 1], [0, 0]])
    labels[1] = 2
    batch = {"semseg": labels, "label_size": torch.tensor([[2, 2], [3, 3]])}
    ev = MultiTaskEvaluator(["semseg"], "nyud", baselines={})
    ev.update({"semseg": preds}, batch)
    out = ev.compute()
    assert out["semseg"]["mIoU"] == pytest.approx(100 * 5 / 9)
    assert out["delta_m"] is None


def test_at_label_size_groups_equal_sizes():
    pred = torch.randn(3, 2, 8, 8)
    target = torch.zeros(3, 6, 5)
    groups = list(at_label_size(pred, target, torch.tensor([[6, 5], [4, 4], [6, 5]])))
    assert [tuple(p.shape) for p, _ in groups] == [(2, 2, 6, 5), (1, 2, 4, 4)]
    assert [tuple(t.shape) for _, t in groups] == [(2, 6, 5), (1, 4, 4)]
    ((p, t),) = at_label_size(pred, target, None)  # no label_size: the whole target
    assert p.shape[-2:] == (6, 5) and t.shape == target.shape


def test_normals_are_renormalised_after_resizing():
    pred = torch.zeros(1, 3, 4, 4)
    pred[:, 2] = 7.0  # constant, not unit length
    gt = torch.zeros(1, 3, 3, 3)
    gt[:, 2] = 1.0
    ev = MultiTaskEvaluator(["normals"], "pascal_context")
    ev.update({"normals": pred}, {"normals": gt, "label_size": torch.tensor([[3, 3]])})
    assert ev.compute()["normals"]["mean"] == pytest.approx(0.0, abs=1e-6)


def _pascal_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, h, w = 2, 8, 8
    preds = {
        "semseg": torch.randn(b, 21, h, w, generator=g),
        "human_parts": torch.randn(b, 7, h, w, generator=g),
        "sal": torch.randn(b, 1, h, w, generator=g),
        "normals": torch.randn(b, 3, h, w, generator=g),
        "edge": torch.randn(b, 1, h, w, generator=g),
    }
    batch = {
        "semseg": torch.randint(0, 21, (b, h, w), generator=g).to(torch.uint8),
        "human_parts": torch.full((b, h, w), IGNORE, dtype=torch.uint8),  # no person in either image
        "sal": torch.randint(0, 2, (b, h, w), generator=g).to(torch.uint8),
        "normals": torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1),
        "edge": torch.randint(0, 2, (b, h, w), generator=g).to(torch.uint8),
        "label_size": torch.tensor([[h, w], [h - 2, w - 1]]),
    }
    batch["human_parts"][0, :4] = 0  # one image with a labelled region
    return preds, batch


def test_compute_twice_is_stable_and_reports_are_plain():
    tasks = ["semseg", "human_parts", "sal", "normals", "edge"]
    ev = MultiTaskEvaluator(tasks, "pascal_context")
    preds, batch = _pascal_batch()
    ev.update(preds, batch)
    first, second = ev.compute(), ev.compute()
    assert first == second
    assert set(first["delta_m_tasks"]) == {"semseg", "human_parts", "sal", "normals"}
    assert isinstance(first["delta_m"], float)
    report = ev.to_json(first)
    json.dumps(report, allow_nan=False)
    assert report["tasks"]["edge"]["in_delta_m"] is False and report["tasks"]["edge"]["baseline"] is None
    assert report["tasks"]["sal"]["baseline"] == 62.35
    table = ev.table(first)
    for task in tasks:
        assert task in table
    assert "not in delta-m" in table and f"{first['delta_m']:+.2f}" in table
    ev.reset()
    assert ev.compute()["semseg"]["mIoU"] != ev.compute()["semseg"]["mIoU"]  # nothing seen: NaN


def test_bad_arguments_are_clear():
    # (the protocol is a choice of the config, checked when it is composed: tests/engine/test_config_schema.py)
    with pytest.raises(ValueError, match="provides"):
        MultiTaskEvaluator(["sal"], "nyud")
    ev = MultiTaskEvaluator(["semseg"], "nyud")
    with pytest.raises(KeyError, match="semseg"):
        ev.update({}, {"semseg": torch.zeros(1, 2, 2)})
