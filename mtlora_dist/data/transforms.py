"""Training augmentation and evaluation resizing for dense multi-task samples (Part B §7).

One geometric warp serves every case. It maps the output grid back into the input image as a single
affine map (flip, then rotation and scale about the centre, then resize to the output size with the
aspect not kept) and samples every field through it, so all maps stay aligned and each is
interpolated once:

* image: bicubic (torch ``grid_sample``), borders black;
* class and binary maps: nearest, borders ``255`` (ignore) -- not background;
* normals: bicubic, then the (x, y) components flipped / rotated with the image and renormalised;
  pixels invalid in the input (0 vector, looked up nearest) or outside it become ``255``;
* depth: nearest, divided by the scale (zooming in by s brings things s times closer), 0 -> ``255``.

Evaluation uses the same warp with no flip/rotation/scale: the image is resized to the input size;
labels are resized too under ``protocol="official"`` or kept at their original size under
``protocol="original"`` (the default).

Outputs are the per-sample batch encoding (compact; converted to float on the device):
``image`` uint8 (3, H, W); class/binary maps uint8 (H, W); ``normals`` float16 (3, H, W);
``depth`` float32 (H, W); ignored pixels 255 everywhere.

Coordinates are continuous with pixel centres at ``i + 0.5``. Normals: x right, y down, z towards
the camera; a rotation by +a degrees turns the content counter-clockwise on screen (OpenCV's
convention, as the official code), and rotates normal vectors the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtlora_dist.tasks.registry import IGNORE_INDEX, get_task

__all__ = [
    "AugmentSpec",
    "AUGMENT",
    "Warp",
    "sample_warp",
    "inverse_affine",
    "warp_sample",
    "encode_labels",
    "train_transform",
    "eval_transform",
]


@dataclass(frozen=True)
class AugmentSpec:
    """Random geometric augmentation of a dataset's training samples."""

    flip_prob: float = 0.5
    max_rotation_deg: float = 0.0                   # angle ~ U(-max, max)
    scale_range: tuple[float, float] | None = None  # scale ~ U(lo, hi) ...
    scale_choices: tuple[float, ...] | None = None  # ... or one of these


AUGMENT: dict[str, AugmentSpec] = {
    "pascal_context": AugmentSpec(max_rotation_deg=20.0, scale_range=(0.75, 1.25)),
    "nyud": AugmentSpec(scale_choices=(1.0, 1.2, 1.5)),
}


@dataclass(frozen=True)
class Warp:
    """One geometric transform: horizontal flip, then rotation (degrees, CCW) and scale about the centre."""

    flip: bool = False
    angle_deg: float = 0.0
    scale: float = 1.0


def sample_warp(spec: AugmentSpec, rng: np.random.Generator) -> Warp:
    """Draw a :class:`Warp` (always three draws, so streams stay aligned whatever the spec)."""
    flip = bool(rng.random() < spec.flip_prob)
    angle = float(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg)) if spec.max_rotation_deg else 0.0
    u = rng.random()
    if spec.scale_range is not None:
        lo, hi = spec.scale_range
        scale = lo + (hi - lo) * float(u)
    elif spec.scale_choices:
        scale = float(spec.scale_choices[min(int(u * len(spec.scale_choices)), len(spec.scale_choices) - 1)])
    else:
        scale = 1.0
    return Warp(flip, angle, scale)


def inverse_affine(in_hw: tuple[int, int], out_hw: tuple[int, int], warp: Warp) -> np.ndarray:
    """2x3 matrix taking output coordinates to input coordinates (continuous, pixel centres at i+0.5)."""
    h, w = in_hw
    ho, wo = out_hw
    a = math.radians(warp.angle_deg)
    # forward rotation+scale (OpenCV): [[s cos, s sin], [-s sin, s cos]]; its inverse:
    a_inv = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / warp.scale
    resize = np.diag([w / wo, h / ho])
    c = np.array([w / 2.0, h / 2.0])
    lin = a_inv @ resize
    off = c - a_inv @ c
    if warp.flip:
        flip = np.diag([-1.0, 1.0])
        lin, off = flip @ lin, flip @ off + np.array([w, 0.0])
    return np.concatenate([lin, off[:, None]], axis=1)


class _Grid:
    """Where each output pixel samples the input, shared by all fields of a sample."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int], warp: Warp) -> None:
        self.in_hw, self.out_hw, self.warp = in_hw, out_hw, warp
        m = inverse_affine(in_hw, out_hw, warp).astype(np.float32)
        xs = np.arange(out_hw[1], dtype=np.float32) + 0.5
        ys = np.arange(out_hw[0], dtype=np.float32) + 0.5
        self.x = m[0, 0] * xs[None, :] + m[0, 1] * ys[:, None] + m[0, 2]
        self.y = m[1, 0] * xs[None, :] + m[1, 1] * ys[:, None] + m[1, 2]
        h, w = in_hw
        ix, iy = np.floor(self.x).astype(np.int64), np.floor(self.y).astype(np.int64)
        self.inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        self.flat = np.clip(iy, 0, h - 1) * w + np.clip(ix, 0, w - 1)
        self._torch_grid: torch.Tensor | None = None

    def nearest(self, field: np.ndarray, fill: float) -> np.ndarray:
        """Nearest-neighbour lookup of an HxW field; ``fill`` outside the input."""
        out = np.take(field.reshape(-1), self.flat)
        out[~self.inside] = fill
        return out

    def bicubic(self, chw: torch.Tensor) -> torch.Tensor:
        """Bicubic sampling of a float (C, h, w) tensor; border-clamped taps, caller masks the outside."""
        if self._torch_grid is None:
            h, w = self.in_hw
            grid = np.stack([2.0 * self.x / w - 1.0, 2.0 * self.y / h - 1.0], axis=-1)
            self._torch_grid = torch.from_numpy(grid.astype(np.float32))[None]
        return F.grid_sample(chw[None], self._torch_grid, mode="bicubic", padding_mode="border", align_corners=False)[0]


def _warp_image(image: np.ndarray, grid: _Grid) -> np.ndarray:
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    out = grid.bicubic(chw).clamp_(0, 255).round_().to(torch.uint8).numpy()
    out[:, ~grid.inside] = 0
    return out


def _warp_map(label: np.ndarray, grid: _Grid) -> np.ndarray:
    return grid.nearest(label, IGNORE_INDEX)


def _rotate_normals(n: np.ndarray, warp: Warp) -> np.ndarray:
    """Flip and rotate the (x, y) components of (3, H, W) normals like the image content."""
    x, y = n[0], n[1]
    if warp.flip:
        x = -x
    if warp.angle_deg:
        a = math.radians(warp.angle_deg)
        c, s = math.cos(a), math.sin(a)
        x, y = c * x + s * y, -s * x + c * y  # CCW on screen, y pointing down
    n[0], n[1] = x, y
    return n


def _finish_normals(n: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Renormalise (3, H, W) normals in place; invalid or near-zero vectors become 255."""
    norm = n[0] * n[0]
    norm += n[1] * n[1]
    norm += n[2] * n[2]
    np.sqrt(norm, out=norm)
    valid = valid & (norm > 1e-3)
    norm[~valid] = 1.0
    n /= norm
    n[:, ~valid] = IGNORE_INDEX
    return n.astype(np.float16)


def _warp_normals(normals: np.ndarray, grid: _Grid) -> np.ndarray:
    n = normals.astype(np.float32, copy=False)
    valid_in = (n[..., 0] != 0) | (n[..., 1] != 0) | (n[..., 2] != 0)
    valid = grid.nearest(valid_in, False) & grid.inside
    sampled = grid.bicubic(torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1)))).numpy()
    return _finish_normals(_rotate_normals(sampled, grid.warp), valid)


def _warp_depth(depth: np.ndarray, grid: _Grid) -> np.ndarray:
    out = grid.nearest(depth.astype(np.float32, copy=False), 0.0) / grid.warp.scale
    out[out <= 0] = IGNORE_INDEX
    return out.astype(np.float32)


def _encode_normals(normals: np.ndarray) -> np.ndarray:
    n = np.array(normals.transpose(2, 0, 1), dtype=np.float32)  # a copy: finished in place
    return _finish_normals(n, (n[0] != 0) | (n[1] != 0) | (n[2] != 0))


def _encode_depth(depth: np.ndarray) -> np.ndarray:
    return np.where(depth > 0, depth, IGNORE_INDEX).astype(np.float32)


# Per target kind: (warp to the output grid, encode at original size). A new kind is one new row.
_KINDS: dict[str, tuple[Callable[[np.ndarray, _Grid], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "class_map": (_warp_map, lambda a: np.ascontiguousarray(a, dtype=np.uint8)),
    "binary_map": (_warp_map, lambda a: np.ascontiguousarray(a, dtype=np.uint8)),
    "normals": (_warp_normals, _encode_normals),
    "depth": (_warp_depth, _encode_depth),
}


def warp_sample(sample: dict[str, Any], tasks: Sequence[str], out_hw: tuple[int, int], warp: Warp) -> dict[str, Any]:
    """Image and labels of a canonical sample warped to ``out_hw`` (batch encoding)."""
    image = sample["image"]
    grid = _Grid(image.shape[:2], tuple(out_hw), warp)
    out: dict[str, Any] = {"__key__": sample["__key__"], "image": _warp_image(image, grid)}
    for task in tasks:
        out[task] = _KINDS[get_task(task).target_kind][0](sample[task], grid)
    return out


def encode_labels(sample: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """Labels of a canonical sample in the batch encoding, at their original size."""
    return {task: _KINDS[get_task(task).target_kind][1](sample[task]) for task in tasks}


def train_transform(sample: dict[str, Any], tasks: Sequence[str], out_hw: tuple[int, int], spec: AugmentSpec,
                    rng: np.random.Generator) -> dict[str, Any]:
    """Random flip/rotation/scale (``spec``) then resize to ``out_hw``."""
    return warp_sample(sample, tasks, out_hw, sample_warp(spec, rng))


def eval_transform(sample: dict[str, Any], tasks: Sequence[str], out_hw: tuple[int, int],
                   protocol: str = "original") -> dict[str, Any]:
    """Resize the image to ``out_hw``; labels at original size (``original``) or resized (``official``)."""
    if protocol == "official":
        return warp_sample(sample, tasks, out_hw, Warp())
    if protocol != "original":
        raise ValueError(f"unknown evaluation protocol '{protocol}'; use 'original' or 'official'")
    out = warp_sample(sample, (), out_hw, Warp())
    out.update(encode_labels(sample, tasks))
    return out
