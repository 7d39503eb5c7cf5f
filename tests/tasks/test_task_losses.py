"""Each loss against hand-computed values and a hand-written reference; empty targets give exact zeros."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtlora_dist.tasks.losses import (
    BalancedBCELoss,
    CrossEntropyLoss,
    DepthL1Loss,
    MultiTaskLoss,
    NormalsL1Loss,
    build_loss,
)
from mtlora_dist.tasks.registry import BUILTIN_DATASETS, DATASET_TASKS, get_task

IGNORE = 255


def test_cross_entropy_by_hand():
    # 3 pixels, 2 classes: logits (0, 0) -> CE ln 2; logits (ln 3, 0) with class 0 -> -ln(3/4); third ignored
    logits = torch.tensor([[0.0, math.log(3.0), 5.0], [0.0, 0.0, -5.0]]).view(1, 2, 1, 3)
    target = torch.tensor([[[0, 0, IGNORE]]], dtype=torch.uint8)
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_cross_entropy_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7)
    target = torch.randint(0, 5, (2, 6, 7))
    target[0, :2] = IGNORE
    # reference: mean over valid pixels of -log softmax at the target class
    logp = logits.log_softmax(1).permute(0, 2, 3, 1)  # (B, H, W, K)
    valid = target != IGNORE
    ref = -logp[valid].gather(1, target[valid].unsqueeze(1)).mean()
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(ref.item(), abs=1e-6)


def _labels(values):
    return torch.tensor(values, dtype=torch.uint8).view(1, 1, len(values))


def test_balanced_bce_saliency_by_hand():
    # logits 0 -> BCE ln 2 everywhere; 1 positive, 3 negatives, 1 ignored -> beta = 3/4 (negatives among valid)
    # loss = (beta * 1 * ln2 + (1 - beta) * 3 * ln2) / 4 valid pixels = 0.375 ln 2
    logits = torch.zeros(1, 1, 1, 5)
    target = _labels([1, 0, 0, 0, IGNORE])
    assert BalancedBCELoss()(logits, target).item() == pytest.approx(0.375 * math.log(2), abs=1e-6)


def test_balanced_bce_edge_fixed_weight_by_hand():
    # (0.95 * 1 * ln2 + 0.05 * 3 * ln2) / 4 = 0.275 ln 2
    logits = torch.zeros(1, 1, 1, 5)
    target = _labels([1, 0, 0, 0, IGNORE])
    assert BalancedBCELoss(pos_weight=0.95)(logits, target).item() == pytest.approx(0.275 * math.log(2), abs=1e-6)


@pytest.mark.parametrize("pos_weight", [None, 0.95])
def test_balanced_bce_matches_official_formula_without_ignore(pos_weight):
    torch.manual_seed(1)
    x = torch.randn(2, 1, 8, 9) * 3
    y = (torch.rand(2, 8, 9) > 0.7).to(torch.uint8)
    lab = y.float().unsqueeze(1)
    # the official numerically stable BCE, written out: x (y - [x >= 0]) - log(1 + exp(x - 2 x [x >= 0]))
    gz = (x >= 0).float()
    val = x * (lab - gz) - torch.log1p(torch.exp(x - 2 * x * gz))
    w = (1 - lab).sum() / lab.numel() if pos_weight is None else pos_weight
    ref = (w * (-(lab * val)).sum() + (1 - w) * (-((1 - lab) * val)).sum()) / lab.numel()
    assert BalancedBCELoss(pos_weight)(x, y).item() == pytest.approx(ref.item(), rel=1e-5)


def test_normals_l1_by_hand():
    # pixel 0: pred (2, 0, 0) -> unit (1, 0, 0) vs target (0, 1, 0): |1| + |-1| + 0 = 2
    # pixel 1: pred 5 * target -> 0; pixel 2: ignored. Mean over 2 pixels x 3 components = 2 / 6
    pred = torch.tensor([[2.0, 0, 0], [0, 0, 5.0], [1.0, 1.0, 1.0]]).T.reshape(1, 3, 1, 3)
    target = torch.tensor([[0.0, 1, 0], [0, 0, 1.0], [IGNORE] * 3]).T.reshape(1, 3, 1, 3).half()
    assert NormalsL1Loss()(pred, target).item() == pytest.approx(1 / 3, abs=1e-6)


def test_depth_l1_by_hand():
    # valid: pixel 0 (|1 - 1.5| = 0.5) and pixel 3 (|4 - 2| = 2); 255 ignored, 0 = no depth
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    target = torch.tensor([1.5, IGNORE, 0.0, 2.0]).view(1, 1, 4)
    assert DepthL1Loss()(pred, target).item() == pytest.approx(1.25, abs=1e-6)


def _all_ignore_batch(dataset: str, b: int = 2, h: int = 4, w: int = 5):
    preds, batch = {}, {}
    for task in DATASET_TASKS[dataset]:
        k = get_task(task).outputs_for(dataset)
        preds[task] = torch.randn(b, k, h, w, requires_grad=True)
        dtype = torch.float16 if task == "normals" else torch.float32 if task == "depth" else torch.uint8
        shape = (b, 3, h, w) if task == "normals" else (b, h, w)
        batch[task] = torch.full(shape, IGNORE, dtype=dtype)
    return preds, batch


@pytest.mark.parametrize("dataset", sorted(BUILTIN_DATASETS))
def test_all_ignore_gives_exact_zero_and_zero_grads(dataset):
    preds, batch = _all_ignore_batch(dataset)
    total, per_task = MultiTaskLoss(list(preds))(preds, batch)
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in per_task.values())
    total.backward()
    for task, p in preds.items():
        assert p.grad is not None, f"{task}: graph disconnected"
        assert torch.isfinite(p.grad).all() and (p.grad == 0).all(), task


def test_depth_zero_labels_are_invalid():
    pred = torch.randn(1, 1, 2, 2, requires_grad=True)
    loss = build_loss("depth")(pred, torch.zeros(1, 2, 2))
    loss.backward()
    assert loss.item() == 0.0 and (pred.grad == 0).all()


def test_total_is_registry_weighted_sum_and_overridable():
    torch.manual_seed(2)
    tasks = ["semseg", "sal", "normals"]
    preds = {"semseg": torch.randn(1, 21, 4, 4), "sal": torch.randn(1, 1, 4, 4), "normals": torch.randn(1, 3, 4, 4)}
    batch = {
        "semseg": torch.randint(0, 21, (1, 4, 4)),
        "sal": torch.randint(0, 2, (1, 4, 4), dtype=torch.uint8),
        "normals": F.normalize(torch.randn(1, 3, 4, 4), dim=1),
    }
    total, per = MultiTaskLoss(tasks)(preds, batch)
    per = {t: v.item() for t, v in per.items()}
    assert total.item() == pytest.approx(1 * per["semseg"] + 5 * per["sal"] + 10 * per["normals"], rel=1e-6)
    total2, _ = MultiTaskLoss(tasks, weights={"sal": 0.5})(preds, batch)
    assert total2.item() == pytest.approx(1 * per["semseg"] + 0.5 * per["sal"] + 10 * per["normals"], rel=1e-6)


def test_missing_task_and_shape_mismatch_are_clear_errors():
    loss = MultiTaskLoss(["semseg"])
    with pytest.raises(KeyError, match="semseg"):
        loss({"semseg": torch.randn(1, 21, 2, 2)}, {})
    with pytest.raises(ValueError, match="resize the logits"):
        loss({"semseg": torch.randn(1, 21, 2, 2)}, {"semseg": torch.zeros(1, 3, 3, dtype=torch.long)})
