"""Dense maps as RGB images, by the task's target kind: class maps with a palette, binary maps and depth
as heat maps, normals as RGB. Labels (batch encoding, 255 = ignore) and predictions (``export.decode``)
go through the same functions, so truth and prediction panels are comparable.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from matplotlib import colormaps

from mtlora_dist.tasks.registry import IGNORE_INDEX, get_task

__all__ = ["IGNORE_SHADES", "colorize", "label_map", "voc_palette"]

# Pixels without a label are drawn as a grey/white checkerboard ("no data"), which no colour map produces.
IGNORE_SHADES = (255, 200)
CHECKER = 4  # pixels per square


def voc_palette(size: int = 256) -> np.ndarray:
    """(size, 3) uint8: the PASCAL VOC colour map (bits of the class id spread over R, G, B)."""
    ids = np.arange(size)
    palette = np.zeros((size, 3), dtype=np.uint8)
    for shift in range(8):
        for channel in range(3):
            palette[:, channel] |= (((ids >> (3 * shift + channel)) & 1) << (7 - shift)).astype(np.uint8)
    return palette


_PALETTE = voc_palette()
_HEAT = (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
_DEPTH = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def _lut(values: np.ndarray, table: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (np.nan_to_num(values.astype(np.float32)) - lo) / max(hi - lo, 1e-6)
    return table[np.clip(scaled * 255, 0, 255).astype(np.uint8)]


def _class_map(values: np.ndarray, value_range) -> np.ndarray:
    return _PALETTE[values.astype(np.int64) % 256]


def _binary_map(values: np.ndarray, value_range) -> np.ndarray:
    return _lut(values, _HEAT, 0.0, 1.0)


def _normals(values: np.ndarray, value_range) -> np.ndarray:
    return (np.clip((values + 1.0) / 2.0, 0, 1) * 255).astype(np.uint8)


def _depth(values: np.ndarray, value_range) -> np.ndarray:
    lo, hi = value_range or (float(np.nanmin(values)), float(np.nanmax(values)))
    return _lut(values, _DEPTH, lo, hi)


_RENDERERS: dict[str, Callable[[np.ndarray, tuple[float, float] | None], np.ndarray]] = {
    "class_map": _class_map,
    "binary_map": _binary_map,
    "normals": _normals,
    "depth": _depth,
}


def label_map(task: str, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A label in the batch encoding -> (values in the layout ``export.decode`` gives, ignore mask (H, W)).
    Normals arrive as (3, H, W) with 255 in every channel where ignored; depth also marks 0 as missing."""
    kind = get_task(task).target_kind
    if kind == "normals":
        ignore = (label == IGNORE_INDEX).any(0)
        return np.moveaxis(label, 0, -1).astype(np.float32), ignore
    ignore = label == IGNORE_INDEX
    if kind == "depth":
        ignore |= label <= 0
    return label, ignore


def colorize(
    task: str, values: np.ndarray, ignore: np.ndarray | None = None, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """(H, W[, 3]) map of ``task`` -> (H, W, 3) uint8; ``ignore`` pixels become a checkerboard.
    ``value_range`` fixes the colour scale of depth (pass the truth's range to both panels)."""
    rgb = _RENDERERS[get_task(task).target_kind](values, value_range)
    if ignore is not None and ignore.any():
        rows, cols = np.indices(ignore.shape)
        checker = np.where((rows // CHECKER + cols // CHECKER) % 2 == 0, *IGNORE_SHADES).astype(np.uint8)
        rgb = rgb.copy()
        rgb[ignore] = checker[ignore][:, None]
    return rgb
