"""Augmentation and resizing: one warp for all maps, per-task interpolation, ignore borders."""

from __future__ import annotations

import numpy as np
import pytest

from mtlora_dist.data.stream.transforms import AUGMENT, Resampling, Warp, eval_transform, sample_warp, warp_sample

H, W = 60, 80
YY, XX = np.mgrid[0:H, 0:W].astype(np.float64) + 0.5


def height_field(x, y):
    return 9.0 * np.exp(-((x - 42) ** 2 + (y - 28) ** 2) / (2 * 14.0**2)) + 0.25 * x - 0.15 * y


def normals_of(height):
    gy, gx = np.gradient(height)
    n = np.stack([-gx, -gy, np.ones_like(gx)], -1)  # x right, y down, z to the camera
    return (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)


def make_sample():
    rng = np.random.default_rng(0)
    labels = (XX // 10 + 3 * (YY // 15)).astype(np.uint8)
    normals = normals_of(height_field(XX, YY))
    normals[:8, :8] = 0  # an invalid patch
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    depth = (1.0 + XX / 40).astype(np.float32)
    depth[-5:, -5:] = 0
    return {
        "__key__": "k",
        "image": image,
        "semseg": labels,
        "sal": (labels % 2).astype(np.uint8),
        "normals": normals,
        "depth": depth,
    }


TASKS = ["semseg", "sal", "normals", "depth"]
BACKENDS = [
    Resampling("opencv", "bilinear"),
    Resampling("opencv", "bicubic"),
    Resampling("torch", "bicubic"),
    Resampling("torch", "bilinear"),
]


@pytest.fixture(params=BACKENDS, ids=lambda r: f"{r.backend}-{r.normals}")
def resampling(request):
    """Every test of the warp runs with both implementations (OpenCV per sample, torch batched)."""
    return request.param


def angle_error_deg(a, b, mask):
    cos = np.clip((a * b).sum(-1)[mask], -1, 1)
    return np.degrees(np.arccos(cos))


def test_identity_warp_keeps_everything(resampling):
    s = make_sample()
    out = warp_sample(s, TASKS, (H, W), Warp(), resampling)
    np.testing.assert_array_equal(out["image"], s["image"].transpose(2, 0, 1))
    np.testing.assert_array_equal(out["semseg"], s["semseg"])
    n = out["normals"].astype(np.float32).transpose(1, 2, 0)
    valid = n[..., 0] != 255
    np.testing.assert_array_equal(valid, np.linalg.norm(s["normals"], axis=-1) > 0)
    assert np.abs(n[valid] - s["normals"][valid]).max() < 2e-3
    np.testing.assert_array_equal(out["depth"], np.where(s["depth"] > 0, s["depth"], 255))


def test_flip_mirrors_maps_and_negates_normal_x(resampling):
    s = make_sample()
    out = warp_sample(s, TASKS, (H, W), Warp(flip=True), resampling)
    np.testing.assert_array_equal(out["semseg"], s["semseg"][:, ::-1])
    np.testing.assert_array_equal(out["image"], s["image"][:, ::-1].transpose(2, 0, 1))
    n = out["normals"].astype(np.float32)
    ref = s["normals"][:, ::-1]
    valid = n[0] != 255
    assert np.abs(n[0][valid] + ref[..., 0][valid]).max() < 2e-3
    assert np.abs(n[1][valid] - ref[..., 1][valid]).max() < 2e-3


@pytest.mark.parametrize(
    "warp", [Warp(angle_deg=17), Warp(angle_deg=-20, scale=0.8), Warp(flip=True, angle_deg=12, scale=1.2)]
)
def test_rotated_normals_match_the_rotated_surface(warp, resampling):
    """Warp a known surface; normals recomputed from the warped height field must match the output."""
    s = make_sample()
    s["normals"] = normals_of(height_field(XX, YY))
    out = warp_sample(s, ["normals"], (H, W), warp, resampling)
    from mtlora_dist.data.stream.transforms import inverse_affine

    m = inverse_affine((H, W), (H, W), warp)
    x_in = m[0, 0] * XX + m[0, 1] * YY + m[0, 2]
    y_in = m[1, 0] * XX + m[1, 1] * YY + m[1, 2]
    expected = normals_of(height_field(x_in, y_in) * warp.scale)  # a scaled copy of the same surface
    n = out["normals"].astype(np.float32).transpose(1, 2, 0)
    inside = n[..., 0] != 255
    inside[:3], inside[-3:], inside[:, :3], inside[:, -3:] = False, False, False, False
    assert inside.sum() > 0.4 * H * W
    assert angle_error_deg(n, expected, inside).mean() < 1.0
    # the opposite rotation sense would be far off: the check can fail
    wrong = out["normals"].astype(np.float32).transpose(1, 2, 0).copy()
    wrong[..., 1] *= -1
    if warp.angle_deg:
        assert angle_error_deg(wrong, expected, inside).mean() > 3.0


def test_rotation_fills_label_borders_with_ignore_not_background(resampling):
    s = make_sample()
    out = warp_sample(s, TASKS, (48, 64), Warp(angle_deg=20, scale=0.75), resampling)
    for task in ("semseg", "sal"):
        assert out[task][0, 0] == 255 and out[task][-1, -1] == 255
        assert set(np.unique(out[task])) <= set(np.unique(s[task])) | {255}  # nearest: no new values
    assert (out["normals"][:, 0, 0] == 255).all() and out["depth"][0, 0] == 255
    assert (out["image"][:, 0, 0] == 0).all()
    centre = out["semseg"][20:28, 28:36]
    assert (centre != 255).all()


def test_depth_is_divided_by_the_scale_and_invalid_is_ignored(resampling):
    s = make_sample()
    out = warp_sample(s, ["depth"], (H, W), Warp(scale=1.5), resampling)
    m = out["depth"] != 255
    assert m.mean() > 0.9
    centre = out["depth"][H // 2, W // 2]
    assert centre == pytest.approx(s["depth"][H // 2, W // 2] / 1.5, rel=0.05)
    assert (out["depth"][m] < s["depth"].max() / 1.5 + 1e-6).all()
    assert out["depth"].dtype == np.float32


def test_outputs_are_compact_and_normals_unit_or_ignored(resampling):
    s = make_sample()
    out = warp_sample(s, TASKS, (32, 40), Warp(angle_deg=9, scale=1.1), resampling)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (3, 32, 40)
    assert out["semseg"].dtype == np.uint8 and out["semseg"].shape == (32, 40)
    n = out["normals"]
    assert n.dtype == np.float16 and n.shape == (3, 32, 40)
    ignored = (n == 255).all(0)
    assert ((n == 255).any(0) == ignored).all()  # all three channels or none
    norms = np.linalg.norm(n.astype(np.float32), axis=0)[~ignored]
    assert np.abs(norms - 1).max() < 2e-3


def test_augmentation_draws_follow_the_recipe():
    rng = np.random.default_rng(0)
    pascal = [sample_warp(AUGMENT["pascal_context"], rng) for _ in range(400)]
    assert all(-20 <= w.angle_deg <= 20 and 0.75 <= w.scale <= 1.25 for w in pascal)
    assert 0.4 < np.mean([w.flip for w in pascal]) < 0.6
    assert max(abs(w.angle_deg) for w in pascal) > 18
    nyud = [sample_warp(AUGMENT["nyud"], rng) for _ in range(300)]
    assert {w.scale for w in nyud} == {1.0, 1.2, 1.5} and all(w.angle_deg == 0 for w in nyud)


def test_eval_protocols(resampling):
    s = make_sample()
    original = eval_transform(s, TASKS, (32, 48), "original", resampling)
    assert original["image"].shape == (3, 32, 48)
    np.testing.assert_array_equal(original["semseg"], s["semseg"])
    assert original["normals"].shape == (3, H, W) and original["depth"].shape == (H, W)
    official = eval_transform(s, TASKS, (32, 48), "official", resampling)
    assert official["semseg"].shape == (32, 48) and official["normals"].shape == (3, 32, 48)
    np.testing.assert_array_equal(official["image"], original["image"])
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        eval_transform(s, TASKS, (32, 48), "other")
