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
    """Where each output pixel samples the input, shared by all fields of a sample.

    Bicubic sampling runs in torch (``grid_sample``), nearest lookups in numpy (faster gathers on
    uint8); everything on one thread.
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int], warp: Warp) -> None:
        self.in_hw, self.out_hw, self.warp = in_hw, out_hw, warp
        m = inverse_affine(in_hw, out_hw, warp)
        xs = torch.arange(out_hw[1], dtype=torch.float32) + 0.5
        ys = torch.arange(out_hw[0], dtype=torch.float32) + 0.5
        x = float(m[0, 0]) * xs[None, :] + float(m[0, 1]) * ys[:, None] + float(m[0, 2])
        y = float(m[1, 0]) * xs[None, :] + float(m[1, 1]) * ys[:, None] + float(m[1, 2])
        h, w = in_hw
        ix, iy = x.floor(), y.floor()
        self.inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        self.outside = (~self.inside).numpy()
        self.flat = (iy.clamp_(0, h - 1) * w + ix.clamp_(0, w - 1)).to(torch.int64).numpy()
        self.grid = torch.stack([x.mul_(2.0 / w).sub_(1.0), y.mul_(2.0 / h).sub_(1.0)], dim=-1)[None]

    def nearest(self, field: np.ndarray, fill: float | bool) -> np.ndarray:
        """Nearest-neighbour lookup of an (h, w) field; ``fill`` outside the input."""
        out = np.take(field.reshape(-1), self.flat)
        np.copyto(out, fill, where=self.outside, casting="unsafe")
        return out

    def bicubic(self, chw: torch.Tensor) -> torch.Tensor:
        """Bicubic sampling of a float (C, h, w) tensor; border-clamped taps, caller masks the outside."""
        return F.grid_sample(chw[None], self.grid, mode="bicubic", padding_mode="border", align_corners=False)[0]


def _chw_float(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) numpy -> contiguous float32 (C, H, W) tensor (one copy; read-only input is fine)."""
    if not array.flags.writeable:  # PIL hands out read-only arrays; torch wants writable memory
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().contiguous()


def _warp_image(image: np.ndarray, grid: _Grid) -> np.ndarray:
    out = grid.bicubic(_chw_float(image)).clamp_(0, 255).round_().masked_fill_(~grid.inside, 0)
    return out.to(torch.uint8).numpy()


def _warp_map(label: np.ndarray, grid: _Grid) -> np.ndarray:
    return grid.nearest(label, IGNORE_INDEX)


def _rotate_normals(n: torch.Tensor, warp: Warp) -> torch.Tensor:
    """Flip and rotate the (x, y) components of (3, H, W) normals like the image content, in place."""
    if warp.flip:
        n[0].neg_()
    if warp.angle_deg:
        a = math.radians(warp.angle_deg)
        c, s = math.cos(a), math.sin(a)
        x, y = n[0].clone(), n[1].clone()
        n[0] = c * x + s * y  # CCW on screen, y pointing down
        n[1] = c * y - s * x
    return n


def _finish_normals(n: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Renormalise (3, H, W) normals in place; invalid or near-zero vectors become 255 (float16 out)."""
    norm = (n[0] * n[0]).add_(n[1] * n[1]).add_(n[2] * n[2]).sqrt_()  # not a dim-0 reduction: slow on CPU
    valid = valid & (norm > 1e-3)
    n.div_(norm.clamp_min_(1e-3)).masked_fill_(~valid, IGNORE_INDEX)
    return n.half().numpy()


def _nonzero_vectors(n: torch.Tensor) -> torch.Tensor:
    return (n[0] != 0) | (n[1] != 0) | (n[2] != 0)


def _warp_normals(normals: np.ndarray, grid: _Grid) -> np.ndarray:
    n = _chw_float(normals)
    valid = torch.from_numpy(grid.nearest(_nonzero_vectors(n).numpy(), False)) & grid.inside
    return _finish_normals(_rotate_normals(grid.bicubic(n), grid.warp), valid)


def _warp_depth(depth: np.ndarray, grid: _Grid) -> np.ndarray:
    out = grid.nearest(depth.astype(np.float32, copy=False), 0.0) / np.float32(grid.warp.scale)
    out[out <= 0] = IGNORE_INDEX
    return out


def _encode_normals(normals: np.ndarray) -> np.ndarray:
    n = _chw_float(normals)  # a copy: finished in place
    return _finish_normals(n, _nonzero_vectors(n))


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
