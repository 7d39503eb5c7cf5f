"""Training augmentation and evaluation resizing for dense multi-task samples (Part B §7).

One geometric warp serves every case. It maps the output grid back into the input image as a single
affine map (flip, then rotation and scale about the centre, then resize to the output size with the
aspect not kept) and samples every field through it, so all maps stay aligned and each is
interpolated once:

* image: bicubic, borders black;
* class and binary maps: nearest, borders ``255`` (ignore) -- not background;
* normals: bilinear (or bicubic: :class:`Resampling`), then the (x, y) components flipped / rotated
  with the image and renormalised; pixels invalid in the input (0 vector, looked up nearest) or
  outside it become ``255``;
* depth: nearest, divided by the scale (zooming in by s brings things s times closer), 0 -> ``255``.

Two implementations of the same warp (:class:`Resampling`): ``"opencv"`` warps one sample on the CPU
(``cv2.warpAffine``: SIMD, fixed-point on uint8, about 3x cheaper than torch on one core), and
``"torch"`` warps a whole padded batch with ``grid_sample``/``gather`` on any device -- what the loader
runs on the training device when augmentation happens there (:func:`warp_batch`). The image may come
decoded at a reduced size (``sample["label_hw"]`` then gives the full size): the image is sampled
through the same map scaled to its size.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from mtlora_dist.tasks.registry import IGNORE_INDEX, get_task

# OpenCV on one thread in this process, set before any OpenCV call: the pipeline's parallelism is the
# DataLoader workers, and an OpenCV thread pool started in the parent does not survive the fork of a
# worker (reconfiguring it there deadlocks).
cv2.setNumThreads(1)

__all__ = [
    "AugmentSpec",
    "AUGMENT",
    "augment_for",
    "Resampling",
    "Warp",
    "warp_batch",
    "warps_to_tensor",
    "reduced_image_size",
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
    max_rotation_deg: float = 0.0  # angle ~ U(-max, max)
    scale_range: tuple[float, float] | None = None  # scale ~ U(lo, hi) ...
    scale_choices: tuple[float, ...] | None = None  # ... or one of these


AUGMENT: dict[str, AugmentSpec] = {
    "pascal_context": AugmentSpec(max_rotation_deg=20.0, scale_range=(0.75, 1.25)),
    "nyud": AugmentSpec(scale_choices=(1.0, 1.2, 1.5)),
}
DEFAULT_AUGMENT = AugmentSpec(scale_range=(0.75, 1.25))  # declared datasets: flips and scales, no rotation


def augment_for(dataset: str) -> AugmentSpec:
    """The training augmentation of ``dataset``: its own, else flips and scales (rotating a street scene or
    a camera-frame normal map is rarely what a dataset of one's own wants)."""
    return AUGMENT.get(dataset, DEFAULT_AUGMENT)


@dataclass(frozen=True)
class Resampling:
    """How the warp is computed: ``backend`` ``"opencv"`` (one sample, CPU) or ``"torch"`` (any device,
    batched); ``normals`` ``"bilinear"`` or ``"bicubic"`` (the baseline; ~2x the cost for a visually
    identical result after renormalisation)."""

    backend: str = "opencv"
    normals: str = "bilinear"

    def __post_init__(self) -> None:
        if self.backend not in ("opencv", "torch") or self.normals not in ("bilinear", "bicubic"):
            raise ValueError(f"unknown resampling {self}; backend: opencv | torch, normals: bilinear | bicubic")


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


def _scaled(m: np.ndarray, full_hw: tuple[int, int], hw: tuple[int, int]) -> np.ndarray:
    """The map ``m`` into a ``full_hw`` field, for the same field stored at ``hw`` (reduced decode)."""
    if tuple(hw) == tuple(full_hw):
        return m
    return np.diag([hw[1] / full_hw[1], hw[0] / full_hw[0]]) @ m


def reduced_image_size(full_hw: tuple[int, int], out_hw: tuple[int, int], warp: Warp) -> tuple[int, int] | None:
    """The smallest image size that still gives every output pixel at least one input pixel, or None
    when that is the full size (no reduction possible): the decoder may shrink the image down to it."""
    lin = inverse_affine(full_hw, out_hw, warp)[:, :2]
    step = float(np.linalg.svd(lin, compute_uv=False)[-1])  # input pixels per output pixel, least direction
    if step < 2.0:
        return None
    return math.ceil(full_hw[0] / step), math.ceil(full_hw[1] / step)


# ------------------------------------------------------------------------------------- OpenCV, per sample


def _cv_map(m: np.ndarray) -> np.ndarray:
    """Our map (pixel centres at i + 0.5) as ``cv2.warpAffine``'s inverse map (centres at i)."""
    out = m.astype(np.float64, copy=True)
    out[:, 2] += 0.5 * (m[:, 0] + m[:, 1]) - 0.5
    return out


def _cv_warp(
    field: np.ndarray, m: np.ndarray, out_hw: tuple[int, int], interp: int, border: int, value: float = 0.0
) -> np.ndarray:
    return cv2.warpAffine(
        field,
        _cv_map(m),
        (out_hw[1], out_hw[0]),
        flags=interp | cv2.WARP_INVERSE_MAP,
        borderMode=border,
        borderValue=(value, value, value, value),
    )


def _cv_nearest(field: np.ndarray, m: np.ndarray, out_hw: tuple[int, int], fill: float) -> np.ndarray:
    """Nearest lookup (the input pixel whose area holds the point); ``fill`` outside the input."""
    return _cv_warp(field, m, out_hw, cv2.INTER_NEAREST, cv2.BORDER_CONSTANT, fill)


def _rotation(warp: Warp) -> tuple[float, float, float]:
    """``(sign of x after the flip, cos, sin)`` turning normal vectors like the image content."""
    a = math.radians(warp.angle_deg)
    return (-1.0 if warp.flip else 1.0), math.cos(a), math.sin(a)


def _rotation_matrix(warp: Warp) -> np.ndarray:
    """3x3 matrix turning normal vectors like the image content: flip x, then rotate (x, y)."""
    sign, c, s = _rotation(warp)
    return np.array([[sign * c, s, 0.0], [-sign * s, c, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)


def _cv_normals(
    normals: np.ndarray, m: np.ndarray, out_hw: tuple[int, int], warp: Warp, inside: np.ndarray, interp: str
) -> np.ndarray:
    """Rotate the vectors first (linear, so it commutes with interpolation), warp, split into planes
    and renormalise there; float16 conversions in torch (vectorised, unlike numpy's)."""
    n = torch.from_numpy(normals if normals.flags.writeable else normals.copy()).float().numpy()
    nonzero = cv2.transform(cv2.multiply(n, n), np.ones((1, 3), np.float32)) > 0
    rotated = cv2.transform(n, _rotation_matrix(warp))
    flag = cv2.INTER_LINEAR if interp == "bilinear" else cv2.INTER_CUBIC
    planes = np.empty((3, *out_hw), dtype=np.float32)
    cv2.split(_cv_warp(rotated, m, out_hw, flag, cv2.BORDER_REPLICATE), [planes[0], planes[1], planes[2]])
    valid = torch.from_numpy((_cv_nearest(nonzero.view(np.uint8), m, out_hw, 0) != 0) & inside)
    t = torch.from_numpy(planes)
    norm = (t[0] * t[0]).add_(t[1] * t[1]).add_(t[2] * t[2]).sqrt_()
    valid &= norm > 1e-3
    t.div_(norm.clamp_min_(1e-3)).masked_fill_(~valid, IGNORE_INDEX)
    return t.half().numpy()


def _warp_sample_cv(
    sample: dict[str, Any], tasks: Sequence[str], out_hw: tuple[int, int], warp: Warp, resampling: Resampling
) -> dict[str, Any]:
    image = sample["image"]
    full = tuple(sample.get("label_hw", image.shape[:2]))
    m = inverse_affine(full, out_hw, warp)
    inside = _cv_nearest(np.ones(full, np.uint8), m, out_hw, 0) != 0
    warped = _cv_warp(image, _scaled(m, full, image.shape[:2]), out_hw, cv2.INTER_CUBIC, cv2.BORDER_REPLICATE)
    chw = np.empty((3, *out_hw), dtype=np.uint8)
    cv2.split(cv2.bitwise_and(warped, warped, mask=inside.view(np.uint8)), [chw[0], chw[1], chw[2]])
    out: dict[str, Any] = {"__key__": sample["__key__"], "image": chw}
    for task in tasks:
        kind, value = get_task(task).target_kind, sample[task]
        if kind == "normals":
            out[task] = _cv_normals(value, m, out_hw, warp, inside, resampling.normals)
        elif kind == "depth":
            depth = _cv_nearest(np.ascontiguousarray(value, dtype=np.float32), m, out_hw, 0.0) / np.float32(warp.scale)
            depth[depth <= 0] = IGNORE_INDEX
            out[task] = depth
        else:
            out[task] = _cv_nearest(np.ascontiguousarray(value, dtype=np.uint8), m, out_hw, IGNORE_INDEX)
    return out


# ------------------------------------------------------------------------------------ torch, batched


def warps_to_tensor(warps: Sequence[Warp]) -> torch.Tensor:
    """(B, 3) float64 ``[flip, angle_deg, scale]``: how warps travel in a batch."""
    return torch.tensor([[float(w.flip), w.angle_deg, w.scale] for w in warps], dtype=torch.float64).reshape(-1, 3)


def _maps(
    warps: torch.Tensor, full_hw: torch.Tensor, image_hw: torch.Tensor, out_hw: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (B, 2, 3) maps into the labels and into the (possibly reduced) image."""
    labels, images = [], []
    for (flip, angle, scale), full, hw in zip(warps.tolist(), full_hw.tolist(), image_hw.tolist(), strict=True):
        m = inverse_affine(tuple(full), out_hw, Warp(bool(flip), angle, scale))
        labels.append(m)
        images.append(_scaled(m, tuple(full), tuple(hw)))
    as_tensor = lambda ms: torch.from_numpy(np.stack(ms)).to(device=device, dtype=torch.float32)  # noqa: E731
    return as_tensor(labels), as_tensor(images)


def _coords(m: torch.Tensor, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input coordinates (B, Ho, Wo) of every output pixel centre."""
    xs = torch.arange(out_hw[1], dtype=torch.float32, device=m.device).add_(0.5).view(1, 1, -1)
    ys = torch.arange(out_hw[0], dtype=torch.float32, device=m.device).add_(0.5).view(1, -1, 1)
    at = lambda r, c: m[:, r, c].view(-1, 1, 1)  # noqa: E731
    return at(0, 0) * xs + at(0, 1) * ys + at(0, 2), at(1, 0) * xs + at(1, 1) * ys + at(1, 2)


def _grid(x: torch.Tensor, y: torch.Tensor, padded_hw: tuple[int, int]) -> torch.Tensor:
    return torch.stack([x * (2.0 / padded_hw[1]) - 1.0, y * (2.0 / padded_hw[0]) - 1.0], dim=-1)


class _Lookup:
    """Nearest lookups into padded (B, Hp, Wp[, C]) fields: each sample clamped to its own size."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, full_hw: torch.Tensor, padded_hw: tuple[int, int]) -> None:
        h = full_hw[:, 0].view(-1, 1, 1).to(x.device)
        w = full_hw[:, 1].view(-1, 1, 1).to(x.device)
        ix, iy = x.floor().long(), y.floor().long()
        self.inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        flat = torch.minimum(iy.clamp(min=0), h - 1) * padded_hw[1] + torch.minimum(ix.clamp(min=0), w - 1)
        self.flat = flat.flatten(1)
        self.shape = x.shape

    def __call__(self, field: torch.Tensor, fill: float) -> torch.Tensor:
        out = field.flatten(1).gather(1, self.flat).view(self.shape)
        return out.masked_fill(~self.inside, fill)


def _torch_normals(
    n: torch.Tensor, grid: torch.Tensor, lookup: _Lookup, warps: torch.Tensor, interp: str
) -> torch.Tensor:
    """(B, Hp, Wp, 3) normals -> (B, 3, Ho, Wo) float16, rotated with the image, invalid = 255."""
    chw = n.permute(0, 3, 1, 2).float().contiguous()  # grid_sample is slower on channels-last input
    nonzero = (chw[:, 0] != 0) | (chw[:, 1] != 0) | (chw[:, 2] != 0)  # faster than any(dim=1) on CPU
    valid = lookup(nonzero, False) & lookup.inside
    out = F.grid_sample(chw, grid, mode=interp, padding_mode="border", align_corners=False)
    rad = torch.deg2rad(warps[:, 1].to(out.device, torch.float32)).view(-1, 1, 1)
    sign = (1.0 - 2.0 * warps[:, 0].to(out.device, torch.float32)).view(-1, 1, 1)
    c, s = rad.cos(), rad.sin()
    x, y, z = out[:, 0] * sign, out[:, 1], out[:, 2]
    x, y = c * x + s * y, c * y - s * x  # CCW on screen, y pointing down
    norm = (x * x + y * y + z * z).sqrt()
    valid &= norm > 1e-3
    out = torch.stack([x, y, z], dim=1) / norm.clamp_min(1e-3).unsqueeze(1)
    return out.masked_fill_(~valid.unsqueeze(1), IGNORE_INDEX).half()


def warp_batch(
    raw: dict[str, Any], tasks: Sequence[str], out_hw: tuple[int, int], resampling: Resampling = Resampling()
) -> dict[str, torch.Tensor]:
    """Warp a padded batch of decoded samples (see ``batch.collate_decoded``) on its tensors' device.

    ``raw``: ``image`` uint8 (B, Hp, Wp, 3), labels (B, Hl, Wl[, 3]) padded by edge replication,
    ``image_hw``/``label_hw`` (B, 2) true sizes, ``warp`` (B, 3) (:func:`warps_to_tensor`). Returns the
    training batch fields (image uint8 (B, 3, Ho, Wo), labels in the batch encoding) on that device.
    """
    image = raw["image"]
    device = image.device
    warps = raw["warp"].cpu()
    m_label, m_image = _maps(warps, raw["label_hw"].cpu(), raw["image_hw"].cpu(), out_hw, device)
    x, y = _coords(m_label, out_hw)
    label_pad = tuple(raw[tasks[0]].shape[1:3]) if tasks else tuple(image.shape[1:3])
    lookup = _Lookup(x, y, raw["label_hw"], label_pad)
    xi, yi = _coords(m_image, out_hw) if m_image is not m_label else (x, y)
    grid = _grid(xi, yi, tuple(image.shape[1:3]))
    chw = image.permute(0, 3, 1, 2).float().contiguous()
    warped = F.grid_sample(chw, grid, mode="bicubic", padding_mode="border", align_corners=False)
    warped = warped.clamp_(0, 255).round_().masked_fill_(~lookup.inside.unsqueeze(1), 0)
    out: dict[str, torch.Tensor] = {"image": warped.to(torch.uint8)}
    for task in tasks:
        kind, value = get_task(task).target_kind, raw[task]
        if kind == "normals":
            out[task] = _torch_normals(value, _grid(x, y, label_pad), lookup, warps, resampling.normals)
        elif kind == "depth":
            scale = warps[:, 2].to(device, torch.float32).view(-1, 1, 1)
            depth = lookup(value.float(), 0.0) / scale
            out[task] = depth.masked_fill_(depth <= 0, IGNORE_INDEX)
        else:
            out[task] = lookup(value, IGNORE_INDEX)
    return out


def _warp_sample_torch(
    sample: dict[str, Any], tasks: Sequence[str], out_hw: tuple[int, int], warp: Warp, resampling: Resampling
) -> dict[str, Any]:
    """One sample through :func:`warp_batch` (a batch of one needs no padding)."""
    image = sample["image"]
    full = tuple(sample.get("label_hw", image.shape[:2]))
    tensor = lambda a: torch.from_numpy(a if a.flags.writeable else a.copy())[None]  # noqa: E731
    raw = {
        "image": tensor(image),
        "image_hw": torch.tensor([image.shape[:2]]),
        "label_hw": torch.tensor([full]),
        "warp": warps_to_tensor([warp]),
        **{t: tensor(sample[t]) for t in tasks},
    }
    out = {k: v[0].numpy() for k, v in warp_batch(raw, tasks, out_hw, resampling).items()}
    return {"__key__": sample["__key__"], **out}


def warp_sample(
    sample: dict[str, Any],
    tasks: Sequence[str],
    out_hw: tuple[int, int],
    warp: Warp,
    resampling: Resampling = Resampling(),
) -> dict[str, Any]:
    """Image and labels of a canonical sample warped to ``out_hw`` (batch encoding, numpy)."""
    out_hw = (int(out_hw[0]), int(out_hw[1]))
    if resampling.backend == "torch":
        return _warp_sample_torch(sample, tasks, out_hw, warp, resampling)
    return _warp_sample_cv(sample, tasks, out_hw, warp, resampling)


def _encode_normals(normals: np.ndarray) -> np.ndarray:
    n = np.asarray(normals, dtype=np.float32).transpose(2, 0, 1)
    norm = np.sqrt((n * n).sum(axis=0))
    valid = (n != 0).any(axis=0) & (norm > 1e-3)
    out = n / np.maximum(norm, 1e-3)
    out[:, ~valid] = IGNORE_INDEX
    return out.astype(np.float16)


def _encode_label(kind: str, value: np.ndarray) -> np.ndarray:
    if kind == "normals":
        return _encode_normals(value)
    if kind == "depth":
        return np.where(value > 0, value, IGNORE_INDEX).astype(np.float32)
    return np.ascontiguousarray(value, dtype=np.uint8)


def encode_labels(sample: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """Labels of a canonical sample in the batch encoding, at their original size."""
    return {task: _encode_label(get_task(task).target_kind, sample[task]) for task in tasks}


def train_transform(
    sample: dict[str, Any],
    tasks: Sequence[str],
    out_hw: tuple[int, int],
    spec: AugmentSpec,
    rng: np.random.Generator,
    resampling: Resampling = Resampling(),
) -> dict[str, Any]:
    """Random flip/rotation/scale (``spec``) then resize to ``out_hw``."""
    return warp_sample(sample, tasks, out_hw, sample_warp(spec, rng), resampling)


def eval_transform(
    sample: dict[str, Any],
    tasks: Sequence[str],
    out_hw: tuple[int, int],
    protocol: str = "original",
    resampling: Resampling = Resampling(),
) -> dict[str, Any]:
    """Resize the image to ``out_hw``; labels at original size (``original``) or resized (``official``)."""
    if protocol == "official":
        return warp_sample(sample, tasks, out_hw, Warp(), resampling)
    if protocol != "original":
        raise ValueError(f"unknown evaluation protocol '{protocol}'; use 'original' or 'official'")
    out = warp_sample(sample, (), out_hw, Warp(), resampling)
    out.update(encode_labels(sample, tasks))
    return out
