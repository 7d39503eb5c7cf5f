"""PASCAL-Context MTL ("PASCAL_MT") as laid out on disk (Part B §8.1).

::

    <root>/JPEGImages/<id>.jpg
    <root>/ImageSets/Context/{train,val}.txt      one id per line
    <root>/ImageSets/Parts/{train,val}.txt        JSON {id: [object class ids]} (not needed: the .mat decides)
    <root>/pascal-context/trainval/<id>.mat       'LabelMap' (PASCAL-Context ids) -> edges, normals mask
    <root>/semseg/VOC12/<id>.png                  preferred; else semseg/pascal-context/<id>.png
    <root>/human_parts/<id>.mat                   PASCAL-Part 'anno' struct
    <root>/normals_distill/<id>.png               RGB, n = 2 v / 255 - 1
    <root>/sal_distill/<id>.png                   grayscale, salient = v / 255 > 0.5
    <root>/db_info/{context_classes.json,nyu_classes.json}   classes with valid normals (see below)

Normals are only trusted on PASCAL-Context classes that also exist in NYUD (plus ``tvmonitor``): the
official loader reads that list from ``data/db_info/{context_classes,nyu_classes}.json`` of the
ASTMT/MTI-Net code (``context_classes.json``: ``{name: LabelMap id}``; ``nyu_classes.json``: NYU class
names). Put those two files in ``<root>/db_info/`` or pass ``db_info=``; the synthetic generator writes
its own.

Normals convention: x to the right, y down (image rows), z towards the camera, as in the official
rotation code.
"""

from __future__ import annotations

import json
import os

import numpy as np
import scipy.io

from mtlora_dist.data.ingest.edges import label_edges
from mtlora_dist.data.ingest.formats.base import LayoutReader, SampleFiles, load_gray, load_rgb, normalize_normals
from mtlora_dist.data.ingest.labels import HUMAN_PART, PERSON_CLASS
from mtlora_dist.tasks.registry import IGNORE_INDEX

__all__ = ["make_reader", "normals_valid_classes", "read_labelmap", "read_human_parts"]

DATASET = "pascal_context"


def read_labelmap(path: str) -> np.ndarray:
    """PASCAL-Context ``LabelMap`` (int32 HxW) from ``pascal-context/trainval/<id>.mat``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PASCAL-Context label file not found: {path}")
    mat = scipy.io.loadmat(path)
    if "LabelMap" not in mat:
        raise ValueError(
            f"{path} has no 'LabelMap' variable (found {sorted(k for k in mat if not k.startswith('__'))})"
        )
    return np.asarray(mat["LabelMap"]).astype(np.int32)


def _text(value: np.ndarray) -> str:
    return str(np.asarray(value).ravel()[0])


def _int(value: np.ndarray) -> int:
    return int(np.asarray(value).ravel()[0])


def read_human_parts(path: str, shape: tuple[int, int]) -> np.ndarray:
    """Six-group human-part map (uint8 HxW) from a PASCAL-Part ``anno`` struct.

    Every person object with part annotations paints its parts with their group id (``HUMAN_PART``),
    in object order; other pixels are background (0). An image where no person has a non-empty part
    mask (no person, or persons whose part masks are all empty) is all ``255``: it has no human-parts
    supervision at all (Part B §5), as in the official reader.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PASCAL-Part annotation not found: {path}")
    anno = scipy.io.loadmat(path)["anno"][0, 0]
    target: np.ndarray | None = None  # at the masks' own size: a label of another size is resized later
    painted = False
    for obj in np.asarray(anno["objects"]).ravel():
        parts = np.asarray(obj["parts"])
        if _int(obj["class_ind"]) != PERSON_CLASS or parts.size == 0:
            continue
        for part in parts.ravel():
            name = _text(part["part_name"])
            if name not in HUMAN_PART:
                raise ValueError(f"{path}: unknown person part '{name}'; known parts: {sorted(HUMAN_PART)}")
            mask = np.asarray(part["mask"]).astype(bool)
            target = np.zeros(mask.shape, dtype=np.uint8) if target is None else target
            if mask.shape != target.shape:
                raise ValueError(f"{path}: part '{name}' mask is {mask.shape}, other masks are {target.shape}")
            target[mask] = HUMAN_PART[name]
            painted = painted or bool(mask.any())
    if target is None or not painted:
        return np.full(shape if target is None else target.shape, IGNORE_INDEX, dtype=np.uint8)
    return target


def normals_valid_classes(db_info: str) -> np.ndarray:
    """LabelMap ids whose normals are trusted: context classes also named in NYU, plus ``tvmonitor``."""
    paths = [os.path.join(db_info, n) for n in ("context_classes.json", "nyu_classes.json")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"normals need the class lists {missing}: copy context_classes.json and nyu_classes.json from the "
            "ASTMT/MTI-Net code's data/db_info/ into <root>/db_info/ (or pass db_info=...)"
        )
    with open(paths[0]) as f:
        context = json.load(f)
    with open(paths[1]) as f:
        nyu = json.load(f)
    ids = {int(context[name]) for name in nyu if name in context and name != "unknown"}
    if "tvmonitor" in context:
        ids.add(int(context["tvmonitor"]))
    return np.array(sorted(ids), dtype=np.int32)


def make_reader(
    root: str, tasks: list[str] | tuple[str, ...] | None = None, db_info: str | None = None
) -> LayoutReader:
    """A :class:`LayoutReader` for the PASCAL-Context MTL layout under ``root``."""
    root = str(root)

    def labelmap(files: SampleFiles) -> np.ndarray:
        return files.once(
            "labelmap", lambda: read_labelmap(files.path("pascal-context", "trainval", f"{files.id}.mat"))
        )

    def semseg(files: SampleFiles) -> np.ndarray:
        path = files.path("semseg", "VOC12", f"{files.id}.png")
        if not os.path.isfile(path):
            path = files.path("semseg", "pascal-context", f"{files.id}.png")
        return load_gray(path, "semseg label").astype(np.uint8)

    def human_parts(files: SampleFiles) -> np.ndarray:
        return read_human_parts(files.path("human_parts", f"{files.id}.mat"), files.shape)

    def sal(files: SampleFiles) -> np.ndarray:
        gray = load_gray(files.path("sal_distill", f"{files.id}.png"), "saliency label")
        return (gray.astype(np.float32) / 255.0 > 0.5).astype(np.uint8)

    valid_classes: list[np.ndarray] = []  # loaded on first use, so a reader without normals needs no db_info

    def normals(files: SampleFiles) -> np.ndarray:
        if not valid_classes:
            valid_classes.append(normals_valid_classes(db_info or os.path.join(root, "db_info")))
        encoded = load_rgb(files.path("normals_distill", f"{files.id}.png")).astype(np.float32)
        n = 2.0 * encoded / 255.0 - 1.0
        valid = np.isin(labelmap(files), valid_classes[0])
        return normalize_normals(np.where(valid[..., None], n, 0.0))

    def edge(files: SampleFiles) -> np.ndarray:
        return label_edges(labelmap(files))

    return LayoutReader(
        DATASET,
        root,
        tasks,
        split_file=lambda split: os.path.join("ImageSets", "Context", f"{split}.txt"),
        image_file=lambda i: os.path.join("JPEGImages", f"{i}.jpg"),
        loaders={"semseg": semseg, "human_parts": human_parts, "sal": sal, "normals": normals, "edge": edge},
        resize_labels=True,  # the official reader resizes a label of another size than its JPEG
    )
