"""NYUD-v2 MTL ("NYUD_MT") as laid out on disk (Part B §8.2).

::

    <root>/images/<id>.jpg
    <root>/segmentation/<id>.png     0 = unlabeled -> 255; 1..40 -> 0..39
    <root>/depth/<id>.npy            metres, 0 = invalid
    <root>/normals/<id>.npy          HxWx3 (x right, y down, z towards the camera); 0 vector = invalid
    <root>/edge/<id>.npy             binary
    <root>/gt_sets/{train,val}.txt   one id per line
"""

from __future__ import annotations

import os

import numpy as np

from mtlora_dist.data.ingest.formats.base import LayoutReader, SampleFiles, load_gray, load_npy, normalize_normals
from mtlora_dist.tasks.registry import IGNORE_INDEX

__all__ = ["make_reader"]

DATASET = "nyud"


def _semseg(files: SampleFiles) -> np.ndarray:
    stored = load_gray(files.path("segmentation", f"{files.id}.png"), "segmentation label").astype(np.int32)
    if stored.max(initial=0) > 40:
        raise ValueError(f"NYUD segmentation {files.id} has class id {stored.max()} > 40")
    return np.where(stored == 0, IGNORE_INDEX, stored - 1).astype(np.uint8)


def _depth(files: SampleFiles) -> np.ndarray:
    depth = load_npy(files.path("depth", f"{files.id}.npy"), "depth").astype(np.float32)
    depth = np.squeeze(depth)
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


def _normals(files: SampleFiles) -> np.ndarray:
    normals = load_npy(files.path("normals", f"{files.id}.npy"), "normals")
    if normals.ndim != 3 or normals.shape[-1] != 3:
        raise ValueError(f"NYUD normals {files.id} must be HxWx3, got {normals.shape}")
    return normalize_normals(np.nan_to_num(normals.astype(np.float32)))


def _edge(files: SampleFiles) -> np.ndarray:
    edge = np.squeeze(load_npy(files.path("edge", f"{files.id}.npy"), "edge"))
    return (edge.astype(np.float32) > 0.5).astype(np.uint8)


def make_reader(root: str, tasks: list[str] | tuple[str, ...] | None = None) -> LayoutReader:
    """A :class:`LayoutReader` for the NYUD-v2 MTL layout under ``root``."""
    return LayoutReader(
        DATASET,
        str(root),
        tasks,
        split_file=lambda split: os.path.join("gt_sets", f"{split}.txt"),
        image_file=lambda i: os.path.join("images", f"{i}.jpg"),
        loaders={"semseg": _semseg, "depth": _depth, "normals": _normals, "edge": _edge},
    )
