"""Every metric against values computed by hand (in the comments) or a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlora_dist.tasks.metrics import DepthMetric, EdgeMetric, NormalsMetric, SaliencyMetric, SegmentationMetric

IGNORE = 255


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _row(values, dtype=torch.float32):
    """A (1, 1, N) map: one image, one row."""
    return torch.tensor(values, dtype=dtype).view(1, 1, -1)


# --------------------------------------------------------------------------------------- segmentation
def test_segmentation_by_hand_absent_class_excluded():
    # gt   0 0 1 1 255 ; pred 0 1 1 1 2. Class 2 occurs only on an ignored pixel: absent.
    # class 0: TP 1, FP 0, FN 1 -> 1/2 ; class 1: TP 2, FP 1, FN 0 -> 2/3
    gt = _row([0, 0, 1, 1, IGNORE], torch.uint8)[0]
    pred = _row([0, 1, 1, 1, 2], torch.long)[0]
    m = SegmentationMetric(3)
    m.update(pred, gt)
    out = m.compute()
    assert out["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)  # 58.33: class 2 left out
    assert out["pixel_acc"] == pytest.approx(75.0)
    assert torch.isnan(m.per_class_iou()[2])
    zero = SegmentationMetric(3, absent="zero")
    zero.update(pred, gt)
    assert zero.compute()["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 3)  # official: absent counts 0


def test_segmentation_logits_equal_labels_and_all_ignore_adds_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 5, 6)
    gt = torch.randint(0, 7, (2, 5, 6))
    a, b = SegmentationMetric(7), SegmentationMetric(7)
    a.update(logits, gt)
    b.update(logits.argmax(1), gt)
    b.update(torch.randn(1, 7, 5, 6), torch.full((1, 5, 6), IGNORE, dtype=torch.uint8))  # image with no person
    assert torch.equal(a.state["confusion"], b.state["confusion"])


def test_segmentation_matches_per_class_reference():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (3, 9, 11))
    gt[0, :3] = IGNORE
    pred = rng.integers(0, 5, (3, 9, 11))
    m = SegmentationMetric(5, absent="zero")
    m.update(torch.from_numpy(pred), torch.from_numpy(gt))
    valid = gt != IGNORE
    ious = []
    for c in range(5):  # the official meters' loop
        tp = np.sum((gt == c) & (pred == c) & valid)
        fp = np.sum((gt != c) & (pred == c) & valid)
        fn = np.sum((gt == c) & (pred != c) & valid)
        ious.append(tp / max(tp + fp + fn, 1e-8))
    assert m.compute()["mIoU"] == pytest.approx(100 * np.mean(ious), abs=1e-9)


def test_segmentation_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="outside"):
        SegmentationMetric(3).update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 7]]))


def test_segmentation_nothing_seen_is_nan():
    assert math.isnan(SegmentationMetric(7).compute()["mIoU"])


# --------------------------------------------------------------------------------------- saliency
def test_saliency_by_hand():
    # thresholds 0.20, 0.25, ..., 0.90 (15). Image A: gt 1 1 0 0, p 0.95 0.62 0.62 0.10
    #   t <= 0.60 (9 thresholds): pred 1 1 1 0 -> TP 2 FP 1 FN 0: IoU 2/3, P 2/3, R 1
    #   t >= 0.65 (6 thresholds): pred 1 0 0 0 -> TP 1 FP 0 FN 1: IoU 1/2, P 1,   R 1/2
    # Image B: gt 0 0 ignore, p 0.1 0.1 0.95 -> empty GT and empty prediction: IoU 1, P 0, R 0
    # Image C: all ignore -> not counted. n = 2.
    # mean IoU: low t (2/3 + 1)/2 = 5/6, high t 3/4 -> mIoU = 5/6
    # low t: P 1/3, R 1/2 -> F 2/5 ; high t: P 1/2, R 1/4 -> F 1/3 -> maxF = 2/5
    p = torch.tensor([[0.95, 0.62, 0.62, 0.10], [0.1, 0.1, 0.95, 0.5], [0.9, 0.9, 0.9, 0.9]])
    logits = torch.log(p / (1 - p)).view(3, 1, 1, 4)
    gt = torch.tensor([[1, 1, 0, 0], [0, 0, IGNORE, IGNORE], [IGNORE] * 4], dtype=torch.uint8).view(3, 1, 4)
    m = SaliencyMetric()
    m.update(logits, gt)
    out = m.compute()
    assert out["mIoU"] == pytest.approx(100 * 5 / 6, abs=1e-6)
    assert out["maxF"] == pytest.approx(100 * 2 / 5, abs=1e-6)


def _jaccard_pr(gt, mask, void):
    """The official jaccard.py / precision_recall, written again."""
    keep = ~void
    if not (gt & keep).any() and not (mask & keep).any():
        iou = 1.0
    else:
        iou = np.sum(gt & mask & keep) / np.sum((gt | mask) & keep)
    tp, fp, fn = np.sum(mask & gt & keep), np.sum(mask & ~gt & keep), np.sum(~mask & gt & keep)
    return iou, tp / (tp + fp + 1e-12), tp / (tp + fn + 1e-12)


def test_saliency_matches_per_image_reference():
    torch.manual_seed(3)
    logits = torch.randn(4, 1, 7, 8) * 2
    gt = (torch.rand(4, 7, 8) > 0.6).to(torch.uint8)
    gt[1, :, :3] = IGNORE
    gt[2] = 0  # an image with no salient pixel
    m = SaliencyMetric()
    m.update(logits[:2], gt[:2])
    m.update(logits[2:], gt[2:])  # streaming over two batches
    prob = torch.sigmoid(logits).squeeze(1).numpy()
    g = gt.numpy()
    thresholds = np.linspace(0.2, 0.9, 15)
    stats = np.array(
        [[_jaccard_pr(g[i] == 1, prob[i] > np.float32(t), g[i] == IGNORE) for t in thresholds] for i in range(4)]
    )  # (images, thresholds, 3)
    miou, prec, rec = stats.mean(0).T
    f = 2 * prec * rec / (prec + rec + 1e-12)
    out = m.compute()
    assert out["mIoU"] == pytest.approx(100 * miou.max(), abs=1e-6)
    assert out["maxF"] == pytest.approx(100 * f.max(), abs=1e-6)


# --------------------------------------------------------------------------------------- normals
def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg)), 0.0]


def test_normals_by_hand():
    # angles to gt (1, 0, 0): 0, 10, 20, 25, 90, 180 degrees, plus one ignored pixel
    # mean 325/6; median (20 + 25)/2 = 22.5; rmse sqrt((0+100+400+625+8100+32400)/6)
    # under 11.25: 2/6, under 22.5: 3/6, under 30: 4/6
    angles = [0, 10, 20, 25, 90, 180]
    pred = torch.tensor([_unit(a) for a in angles] + [_unit(0)]) * 3.0  # not unit length: normalised inside
    gt = torch.tensor([[1.0, 0.0, 0.0]] * 6 + [[IGNORE] * 3])
    m = NormalsMetric()
    m.update(pred.T.reshape(1, 3, 1, 7), gt.T.reshape(1, 3, 1, 7).half())
    out = m.compute()
    assert out["mean"] == pytest.approx(325 / 6, abs=1e-4)  # float32 angles
    assert out["median"] == pytest.approx(22.5, abs=0.01)  # histogram resolution 0.01 degrees
    assert out["rmse"] == pytest.approx(math.sqrt(41625 / 6), abs=1e-4)
    assert out["within_11.25"] == pytest.approx(100 * 2 / 6)
    assert out["within_22.5"] == pytest.approx(100 * 3 / 6)
    assert out["within_30"] == pytest.approx(100 * 4 / 6)


def test_normals_median_matches_numpy():
    torch.manual_seed(4)
    pred = torch.randn(2, 3, 9, 10)
    gt = F.normalize(torch.randn(2, 3, 9, 10), dim=1)
    m = NormalsMetric()
    m.update(pred, gt)
    cos = (F.normalize(pred, dim=1) * gt).sum(1).clamp(-1, 1).double()
    angles = torch.rad2deg(torch.acos(cos)).flatten().numpy()
    out = m.compute()
    assert out["median"] == pytest.approx(np.median(angles), abs=0.01)
    assert out["mean"] == pytest.approx(angles.mean(), abs=1e-4)


# --------------------------------------------------------------------------------------- edge
def test_edge_by_hand():
    # thresholds 0.01 ... 0.99. gt 1 1 0 0 ignore; p 0.905 0.305 0.605 0.105 0.99
    # t <= 0.10: all 4 predicted: TP 2 FP 2 FN 0 -> F 2/3
    # 0.11 <= t <= 0.30: {.905 .305 .605}: TP 2 FP 1 -> P 2/3 R 1 -> F 0.8   <- best, first at t = 0.11
    # 0.31 <= t <= 0.60: {.905 .605}: P 1/2 R 1/2 -> F 1/2 ; 0.61 <= t <= 0.90: {.905}: P 1 R 1/2 -> F 2/3
    p = [0.905, 0.305, 0.605, 0.105, 0.99]
    logits = torch.tensor([_logit(v) for v in p]).view(1, 1, 1, 5)
    gt = _row([1, 1, 0, 0, IGNORE], torch.uint8)
    m = EdgeMetric()
    m.update(logits, gt)
    out = m.compute()
    assert out["odsF"] == pytest.approx(80.0, abs=1e-6)
    assert out["ods_threshold"] == pytest.approx(0.11, abs=1e-9)
    # loss: positives weighted 0.95, negatives 0.05, mean over the 4 valid pixels
    loss = (0.95 * (-math.log(0.905) - math.log(0.305)) + 0.05 * (-math.log(1 - 0.605) - math.log(1 - 0.105))) / 4
    assert out["loss"] == pytest.approx(loss, rel=1e-5)


def test_edge_counts_are_dataset_level():
    # image 1: one edge pixel found at every threshold; image 2: one edge pixel never found.
    # Dataset counts TP 1, FN 1, FP 0 -> P 1, R 1/2 -> F 2/3 (a per-image average would differ: (1 + 0)/2)
    logits = torch.tensor([[_logit(0.999), -9.0], [-9.0, -9.0]]).view(2, 1, 1, 2)
    gt = torch.tensor([[1, 0], [1, 0]], dtype=torch.uint8).view(2, 1, 2)
    m = EdgeMetric()
    m.update(logits, gt)
    assert m.compute()["odsF"] == pytest.approx(100 * 2 / 3, abs=1e-6)


# --------------------------------------------------------------------------------------- depth
def test_depth_by_hand():
    # valid pixels 0 and 1 (255 ignored, 0 = no depth): squared errors 1, 0; log errors ln 2, 0
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    gt = _row([2.0, 2.0, IGNORE, 0.0])
    m = DepthMetric()
    m.update(pred, gt)
    out = m.compute()
    assert out["rmse"] == pytest.approx(math.sqrt(1 / 2), abs=1e-9)
    assert out["log_rmse"] == pytest.approx(math.log(2) / math.sqrt(2), abs=1e-9)


# --------------------------------------------------------------------------------------- common
@pytest.mark.parametrize(
    "make", [lambda: SegmentationMetric(4), SaliencyMetric, NormalsMetric, EdgeMetric, DepthMetric]
)
def test_reset_and_all_reduce_without_process_group(make):
    torch.manual_seed(5)
    m = make()
    empty = {k: v.clone() for k, v in m.state.items()}
    if isinstance(m, SegmentationMetric):
        m.update(torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3)))
    elif isinstance(m, NormalsMetric):
        m.update(torch.randn(2, 3, 3, 3), F.normalize(torch.randn(2, 3, 3, 3), dim=1))
    else:
        m.update(torch.randn(2, 1, 3, 3), torch.randint(0, 2, (2, 3, 3)).float() + 1)
    before = {k: v.clone() for k, v in m.state.items()}
    m.all_reduce()  # no process group: no-op
    assert all(torch.equal(before[k], m.state[k]) for k in before)
    assert any(not torch.equal(before[k], empty[k]) for k in before)
    m.reset()
    assert all(torch.equal(empty[k], m.state[k]) for k in empty)
