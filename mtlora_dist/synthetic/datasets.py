"""Synthetic PASCAL-Context / NYUD-v2 datasets written in the real on-disk layouts.

Every label is a function of what the image shows, so a tiny model learns every task in minutes:

* class = colour: each semantic class has its own strongly saturated hue (people: pastel hues, one
  per body-part group; background surfaces: greyish), and shading changes brightness only;
* human parts = fixed geometric pieces of a person figure (head, torso, arms, legs...), each with its
  own colour;
* saliency = the foreground objects and people;
* normals = the gradient of a known height field (a bumpy wall, a tilted floor, domed objects), and the
  image is shaded by them (Lambert, light from the upper left);
* edges = boundaries of the class (PASCAL: ``LabelMap``) map; depth (NYUD) = distance of the same
  surfaces, also visible as haze.

Sizes vary per image and are not square, so evaluation at original resolution is exercised. The
PASCAL layout gets ``.mat`` files (``LabelMap`` and a PASCAL-Part ``anno`` struct with real part
names) so the readers run exactly as on the real data. Deterministic by seed.

CLI: ``python -m mtlora_dist.synthetic.datasets --dataset pascal_context --root DIR --num-train 32 --num-val 16``
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.io
from PIL import Image

from mtlora_dist.data.ingest.edges import label_edges
from mtlora_dist.data.ingest.labels import HUMAN_PART, PERSON_CLASS, VOC_CLASSES
from mtlora_dist.storage.atomic import atomic_write_text
from mtlora_dist.tasks.registry import DATASET_TASKS, IGNORE_INDEX

__all__ = ["Scene", "make_scene", "generate", "ensure_synthetic", "synthetic_shards", "sample_ids", "main"]

MARKER = "SYNTHETIC.json"  # written last: its presence means the dataset is complete
LIGHT = np.array([-0.5, -0.6, 1.0]) / np.linalg.norm([-0.5, -0.6, 1.0])  # x right, y down, z to camera
JPEG_QUALITY = 95

# Real PASCAL-Context "LabelMap" ids (the 459-class labels.txt) of the classes the generator paints, so
# that the real db_info lists (context_classes.json: {name: id}) apply to synthetic data too.
CONTEXT_IDS: dict[str, int] = {
    "aeroplane": 2, "bicycle": 23, "bird": 25, "boat": 31, "bottle": 34, "bus": 45, "car": 59, "cat": 65,
    "chair": 72, "cow": 98, "dog": 113, "floor": 158, "horse": 207, "motorbike": 258, "person": 284,
    "pottedplant": 308, "sheep": 347, "sky": 360, "sofa": 368, "table": 397, "train": 416, "tvmonitor": 427,
    "wall": 440,
}  # fmt: skip
CONTEXT_NAME = {"diningtable": "table"}  # VOC class name -> PASCAL-Context name, where they differ
# Classes whose normals are trusted (real data: context classes that also exist in NYU, + tvmonitor).
NYU_COMPATIBLE = ["unknown", "wall", "floor", "bottle", "chair", "table", "person", "sofa"]


def context_id(voc_class: str) -> int:
    """The PASCAL-Context LabelMap id of a VOC class."""
    return CONTEXT_IDS[CONTEXT_NAME.get(voc_class, voc_class)]


# (part name, group) drawn for each person; the HUMAN_PART mapping of labels.py turns names into groups.
PART_GROUP_HUES = {1: 0.07, 2: 0.62, 3: 0.78, 4: 0.95, 5: 0.45, 6: 0.28}


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _object_palette(n: int, skip: tuple[int, ...] = ()) -> dict[int, np.ndarray]:
    """Saturated, evenly spaced hues for classes 1..n (people are coloured per part instead)."""
    classes = [c for c in range(1, n + 1) if c not in skip]
    step = 7  # coprime with 19 and 40: neighbouring class ids get far-apart hues
    return {
        c: _hsv((i * step % len(classes)) / len(classes), 0.9 if i % 2 == 0 else 0.7, 0.95)
        for i, c in enumerate(classes)
    }


VOC_PALETTE = _object_palette(20, skip=(PERSON_CLASS,))
NYU_PALETTE = _object_palette(40)
PART_COLOURS = {g: _hsv(h, 0.35, 1.0) for g, h in PART_GROUP_HUES.items()}
HAIR_COLOUR = _hsv(0.07, 0.35, 0.55)


@dataclass
class Scene:
    """One synthetic sample: the image, the canonical labels and what the layout files need."""

    dataset: str
    image: np.ndarray  # uint8 HxWx3
    semseg: np.ndarray  # uint8 HxW canonical class ids (255 ignore)
    sal: np.ndarray  # uint8 HxW {0,1}
    normals: np.ndarray  # float32 HxWx3 unit vectors everywhere (before validity)
    normals_valid: np.ndarray  # bool HxW
    region: np.ndarray  # int32 HxW: PASCAL LabelMap ids / NYUD stored class ids
    human_parts: np.ndarray | None = None  # uint8 HxW groups, 255 when no person (PASCAL)
    depth: np.ndarray | None = None  # float32 HxW metres, 0 invalid (NYUD)
    objects: list[dict[str, Any]] = field(default_factory=list)  # PASCAL-Part objects

    @property
    def edge(self) -> np.ndarray:
        return label_edges(self.region)

    def labels(self) -> dict[str, np.ndarray]:
        """The canonical labels a reader must return for this scene (the dataset's tasks only)."""
        out = {
            "semseg": self.semseg,
            "sal": self.sal,
            "edge": self.edge,
            "human_parts": self.human_parts,
            "normals": np.where(self.normals_valid[..., None], self.normals, 0.0).astype(np.float32),
            "depth": self.depth,
        }
        return {task: out[task] for task in DATASET_TASKS[self.dataset]}


class _Canvas:
    """Paints layers back to front; each layer brings its own height field for normals."""

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
        self.colour = np.zeros((h, w, 3), np.float32)
        self.normals = np.zeros((h, w, 3), np.float32)
        self.semseg = np.zeros((h, w), np.uint8)
        self.region = np.zeros((h, w), np.int32)
        self.fg = np.zeros((h, w), bool)
        self.depth = np.zeros((h, w), np.float32)

    def paint(
        self,
        mask: np.ndarray,
        height: np.ndarray,
        colour: np.ndarray,
        semseg: int,
        region: int,
        depth: np.ndarray | float = 0.0,
        fg: bool = False,
    ) -> None:
        gy, gx = np.gradient(height.astype(np.float32))
        n = np.stack([-gx, -gy, np.ones_like(gx)], axis=-1)
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        self.normals[mask] = n[mask]
        self.colour[mask] = colour
        self.semseg[mask] = semseg
        self.region[mask] = region
        self.fg[mask] = fg
        self.depth[mask] = depth if np.isscalar(depth) else np.asarray(depth)[mask]

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> tuple[np.ndarray, np.ndarray]:
        r2 = ((self.xx - cx) / rx) ** 2 + ((self.yy - cy) / ry) ** 2
        return r2 <= 1.0, 0.6 * min(rx, ry) * np.clip(1.0 - r2, 0.0, None)

    def box(self, x0: float, y0: float, x1: float, y1: float, across: str = "both") -> tuple[np.ndarray, np.ndarray]:
        u = (self.xx - (x0 + x1) / 2) / max((x1 - x0) / 2, 1e-3)
        v = (self.yy - (y0 + y1) / 2) / max((y1 - y0) / 2, 1e-3)
        mask = (np.abs(u) <= 1) & (np.abs(v) <= 1)
        a = 0.6 * min(x1 - x0, y1 - y0) / 2
        profile = {"x": 1 - u**2, "y": 1 - v**2, "both": (1 - u**2) * (1 - v**2)}[across]
        return mask, a * np.clip(profile, 0.0, None)

    def shade(self, rng: np.random.Generator, haze: np.ndarray | None = None) -> np.ndarray:
        light = 0.55 + 0.45 * np.clip(self.normals @ LIGHT, 0.0, 1.0)
        img = self.colour * light[..., None]
        if haze is not None:
            img = img * haze[..., None]
        img = img * 255.0 + rng.normal(0.0, 2.0, img.shape)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _person_parts(cx: float, top: float, s: float) -> list[tuple[str, str, tuple[float, ...]]]:
    """(part name, shape, geometry) of a standing figure of height ``s``; PASCAL-Part names."""
    parts: list[tuple[str, str, tuple[float, ...]]] = [
        ("head", "ellipse", (cx, top + 0.08 * s, 0.07 * s, 0.08 * s)),
        ("neck", "box", (cx - 0.03 * s, top + 0.15 * s, cx + 0.03 * s, top + 0.18 * s)),
        ("torso", "box", (cx - 0.1 * s, top + 0.18 * s, cx + 0.1 * s, top + 0.5 * s)),
    ]
    for side, sign in (("l", -1), ("r", 1)):
        ax0, ax1 = sorted((cx + sign * 0.1 * s, cx + sign * 0.16 * s))
        lx0, lx1 = sorted((cx + sign * 0.01 * s, cx + sign * 0.09 * s))
        parts += [
            (f"{side}uarm", "box", (ax0, top + 0.18 * s, ax1, top + 0.34 * s)),
            (f"{side}larm", "box", (ax0, top + 0.34 * s, ax1, top + 0.47 * s)),
            (f"{side}hand", "box", (ax0, top + 0.47 * s, ax1, top + 0.52 * s)),
            (f"{side}uleg", "box", (lx0, top + 0.5 * s, lx1, top + 0.74 * s)),
            (f"{side}lleg", "box", (lx0, top + 0.74 * s, lx1, top + 0.94 * s)),
            (f"{side}foot", "box", (lx0 - 0.01 * s, top + 0.94 * s, lx1 + 0.01 * s, top + 1.0 * s)),
        ]
    return parts


def _draw_person(canvas: _Canvas, rng: np.random.Generator, depth: float) -> dict[str, Any]:
    h, w = canvas.h, canvas.w
    s = rng.uniform(0.45, 0.8) * h
    cx = rng.uniform(0.2 * s, w - 0.2 * s) if w > 0.4 * s else w / 2
    top = rng.uniform(0.0, max(h - s, 0.0) + 0.1 * s)
    parts: list[tuple[str, np.ndarray]] = []
    for name, shape, geom in _person_parts(cx, top, s):
        if shape == "ellipse":
            mask, height = canvas.ellipse(*geom)
        else:
            x0, y0, x1, y1 = geom
            mask, height = canvas.box(x0, y0, x1, y1, across="x" if (y1 - y0) > (x1 - x0) else "y")
        colour = PART_COLOURS[HUMAN_PART[name]]
        canvas.paint(mask, height, colour, PERSON_CLASS, CONTEXT_IDS["person"], depth=depth, fg=True)
        parts.append((name, mask))
        if name == "head":  # hair: the top of the head, its own part and colour
            hair = mask & (canvas.yy < geom[1] - 0.35 * geom[3])
            canvas.paint(hair, height, HAIR_COLOUR, PERSON_CLASS, CONTEXT_IDS["person"], depth=depth, fg=True)
            parts.append(("hair", hair))
    drawn = np.logical_or.reduce([m for _, m in parts])
    return {"class": "person", "class_ind": PERSON_CLASS, "parts": parts, "_drawn": drawn}


def _draw_object(canvas: _Canvas, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mask and height field of an ellipse or a box somewhere on the canvas."""
    h, w = canvas.h, canvas.w
    rx, ry = rng.uniform(0.1, 0.22) * w, rng.uniform(0.1, 0.22) * h
    cx, cy = rng.uniform(rx * 0.5, w - rx * 0.5), rng.uniform(ry * 0.5, h - ry * 0.5)
    if rng.random() < 0.5:
        return canvas.ellipse(cx, cy, rx, ry)
    return canvas.box(cx - rx, cy - ry, cx + rx, cy + ry)


def _bumps(canvas: _Canvas, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    fx, fy = rng.uniform(1.5, 3.5, size=2) * 2 * np.pi / np.array([canvas.w, canvas.h])
    px, py = rng.uniform(0, 2 * np.pi, size=2)
    return amplitude * np.sin(fx * canvas.xx + px) * np.sin(fy * canvas.yy + py)


def _pascal_scene(rng: np.random.Generator, h: int, w: int) -> Scene:
    c = _Canvas(h, w)
    horizon = rng.uniform(0.35, 0.6) * h
    upper = c.yy < horizon
    if rng.random() < 0.3:
        c.paint(upper, np.zeros((h, w)), _hsv(0.58, 0.2, 0.95), 0, CONTEXT_IDS["sky"])
    else:
        c.paint(upper, _bumps(c, rng, 0.04 * w), _hsv(0.11, 0.15, rng.uniform(0.7, 0.9)), 0, CONTEXT_IDS["wall"])
    floor_height = 0.8 * (c.yy - horizon) + _bumps(c, rng, 0.02 * w)
    c.paint(~upper, floor_height, _hsv(0.08, 0.25, rng.uniform(0.45, 0.6)), 0, CONTEXT_IDS["floor"])

    objects: list[dict[str, Any]] = []
    n_people = int(rng.choice([0, 1, 2], p=[0.4, 0.45, 0.15]))
    kinds = ["object"] * int(rng.integers(1, 4)) + ["person"] * n_people
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "person":
            obj = _draw_person(c, rng, 0.0)
        else:
            cls = int(rng.choice(list(VOC_PALETTE)))
            mask, height = _draw_object(c, rng)
            c.paint(mask, height, VOC_PALETTE[cls], cls, context_id(VOC_CLASSES[cls]), fg=True)
            # animals get a "head" part: a reader must ignore parts of non-person objects
            parts = (
                [("head", mask & (c.yy < c.yy[mask].min() + 4))] if cls in (3, 8, 10, 12, 13, 17) and mask.any() else []
            )
            obj = {"class": VOC_CLASSES[cls], "class_ind": cls, "parts": parts, "_drawn": mask}
        objects.append(obj)

    # What is visible after occlusion decides the labels (later objects cover earlier ones).
    visible = _visible_instances(c, objects)
    parts_map = np.zeros((h, w), np.uint8)
    any_person = False
    for obj, vis in zip(objects, visible, strict=True):
        obj["mask"] = vis
        obj["parts"] = [(name, m & vis) for name, m in obj["parts"]]
        if obj["class_ind"] == PERSON_CLASS and obj["parts"]:
            any_person = True
            for name, m in obj["parts"]:
                parts_map[m] = HUMAN_PART[name]
    if not any_person:
        parts_map[:] = IGNORE_INDEX
    valid_ids = [CONTEXT_IDS[n] for n in NYU_COMPATIBLE if n in CONTEXT_IDS] + [CONTEXT_IDS["tvmonitor"]]
    return Scene(
        "pascal_context",
        image=c.shade(rng),
        semseg=c.semseg.copy(),
        sal=c.fg.astype(np.uint8),
        normals=c.normals,
        normals_valid=np.isin(c.region, valid_ids),
        region=c.region,
        human_parts=parts_map,
        objects=objects,
    )


def _visible_instances(c: _Canvas, objects: list[dict[str, Any]]) -> list[np.ndarray]:
    """Visible mask of each object, given that objects were painted in list order."""
    owner = np.full((c.h, c.w), -1, np.int32)
    for i, obj in enumerate(objects):
        owner[obj.pop("_drawn")] = i
    return [owner == i for i in range(len(objects))]


def _nyud_scene(rng: np.random.Generator, h: int, w: int) -> Scene:
    c = _Canvas(h, w)
    horizon = rng.uniform(0.45, 0.65) * h
    wall_depth = rng.uniform(3.0, 5.0)
    upper = c.yy < horizon
    ceiling = upper & (c.yy < rng.uniform(0.0, 0.2) * h)
    wall = upper & ~ceiling
    c.paint(wall, _bumps(c, rng, 0.03 * w), NYU_PALETTE[1], 0, 1, depth=wall_depth)
    c.paint(ceiling, -0.8 * (c.yy - horizon), NYU_PALETTE[22], 21, 22, depth=wall_depth * 0.9)
    frac = np.clip((c.yy - horizon) / max(h - horizon, 1.0), 0.0, 1.0)
    c.paint(~upper, 0.8 * (c.yy - horizon), NYU_PALETTE[2], 1, 2, depth=wall_depth + frac * (1.2 - wall_depth))
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.choice([k for k in NYU_PALETTE if k not in (1, 2, 22)]))
        mask, height = _draw_object(c, rng)
        distance = rng.uniform(1.2, wall_depth - 0.5)
        depth = distance - height / max(height.max(), 1e-3) * 0.3
        c.paint(mask, height, NYU_PALETTE[cls], cls - 1, cls, depth=depth, fg=True)
    # Sensor holes (no depth) and unlabeled patches, as in the real data.
    depth = c.depth.copy()
    semseg = c.semseg.copy()
    region = c.region.copy()
    for target in ("depth", "semseg"):
        y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        dy, dx = int(rng.integers(2, max(3, h // 10))), int(rng.integers(2, max(3, w // 10)))
        if target == "depth":
            depth[y : y + dy, x : x + dx] = 0.0
        else:
            semseg[y : y + dy, x : x + dx] = IGNORE_INDEX
            region[y : y + dy, x : x + dx] = 0
    haze = np.clip(1.25 - 0.1 * c.depth, 0.6, 1.1)
    return Scene(
        "nyud",
        image=c.shade(rng, haze),
        semseg=semseg,
        sal=c.fg.astype(np.uint8),
        normals=c.normals,
        normals_valid=np.ones((h, w), bool),
        region=region,
        depth=depth.astype(np.float32),
    )


def make_scene(dataset: str, seed: int, split: str, index: int, size: int = 112) -> Scene:
    """The scene of sample ``index`` of ``split``: a pure function of its arguments."""
    split_code = {"train": 0, "val": 1}.get(split, zlib.crc32(split.encode()) + 2)
    rng = np.random.default_rng(
        np.random.SeedSequence([seed, split_code, index, 0 if dataset == "pascal_context" else 1])
    )
    h = int(rng.integers(round(0.75 * size), size + 1))
    w = int(rng.integers(round(0.85 * size), round(1.15 * size) + 1))
    if dataset == "pascal_context":
        return _pascal_scene(rng, h, w)
    if dataset == "nyud":
        return _nyud_scene(rng, h, w)
    raise ValueError(f"unknown dataset '{dataset}'; valid: ['nyud', 'pascal_context']")


def sample_ids(dataset: str, split: str, count: int, offset: int = 0) -> list[str]:
    """Ids in the style of each dataset (no dots: they become tar keys)."""
    if dataset == "pascal_context":
        year = {"train": 2008, "val": 2010}.get(split, 2011)
        return [f"{year}_{i:06d}" for i in range(count)]
    return [f"{offset + i:06d}" for i in range(count)]


# ---------------------------------------------------------------------------------------------- writers


def _save_png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _save_jpeg(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY)


def _save_npy(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, array)


def _anno_struct(sample_id: str, objects: list[dict[str, Any]]) -> dict[str, Any]:
    """A PASCAL-Part ``anno`` struct: imname + objects(class, class_ind, mask, parts(part_name, mask))."""
    obj_dtype = [("class", object), ("class_ind", object), ("mask", object), ("parts", object)]
    part_dtype = [("part_name", object), ("mask", object)]
    records = np.zeros((1, len(objects)), dtype=obj_dtype)
    for i, obj in enumerate(objects):
        if obj["parts"]:
            parts = np.zeros((1, len(obj["parts"])), dtype=part_dtype)
            for j, (name, mask) in enumerate(obj["parts"]):
                parts[0, j] = (name, mask.astype(np.uint8))
        else:
            parts = np.zeros((0, 0))
        records[0, i] = (
            obj["class"],
            np.array([[obj["class_ind"]]], dtype=np.uint8),
            obj["mask"].astype(np.uint8),
            parts,
        )
    return {"imname": sample_id, "objects": records}


def _write_pascal(root: str, sample_id: str, scene: Scene) -> None:
    _save_jpeg(os.path.join(root, "JPEGImages", f"{sample_id}.jpg"), scene.image)
    labelmap = os.path.join(root, "pascal-context", "trainval", f"{sample_id}.mat")
    os.makedirs(os.path.dirname(labelmap), exist_ok=True)
    scipy.io.savemat(labelmap, {"LabelMap": scene.region.astype(np.uint16)}, do_compression=True)
    _save_png(os.path.join(root, "semseg", "VOC12", f"{sample_id}.png"), scene.semseg)
    parts = os.path.join(root, "human_parts", f"{sample_id}.mat")
    os.makedirs(os.path.dirname(parts), exist_ok=True)
    scipy.io.savemat(parts, {"anno": _anno_struct(sample_id, scene.objects)}, do_compression=True)
    encoded = np.clip(np.rint((scene.normals + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
    _save_png(os.path.join(root, "normals_distill", f"{sample_id}.png"), encoded)
    # distilled saliency is soft: keep it away from the 0.5 threshold so the binary label is exact
    noise = np.random.default_rng(zlib.crc32(sample_id.encode())).integers(0, 40, scene.sal.shape)
    soft = np.where(scene.sal > 0, 255 - noise, noise).astype(np.uint8)
    _save_png(os.path.join(root, "sal_distill", f"{sample_id}.png"), soft)


def _write_nyud(root: str, sample_id: str, scene: Scene) -> None:
    _save_jpeg(os.path.join(root, "images", f"{sample_id}.jpg"), scene.image)
    stored = np.where(scene.semseg == IGNORE_INDEX, 0, scene.semseg.astype(np.int32) + 1).astype(np.uint8)
    _save_png(os.path.join(root, "segmentation", f"{sample_id}.png"), stored)
    _save_npy(os.path.join(root, "depth", f"{sample_id}.npy"), scene.depth.astype(np.float32))
    _save_npy(os.path.join(root, "normals", f"{sample_id}.npy"), scene.normals.astype(np.float32))
    _save_npy(os.path.join(root, "edge", f"{sample_id}.npy"), scene.edge.astype(np.float32))


def _write_split(root: str, dataset: str, split: str, ids: list[str], objects: dict[str, list[int]]) -> None:
    if dataset == "pascal_context":
        path = os.path.join(root, "ImageSets", "Context", f"{split}.txt")
        parts_path = os.path.join(root, "ImageSets", "Parts", f"{split}.txt")
        os.makedirs(os.path.dirname(parts_path), exist_ok=True)
        with open(parts_path, "w") as f:
            json.dump(objects, f, sort_keys=True)
    else:
        path = os.path.join(root, "gt_sets", f"{split}.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{i}\n" for i in ids))


WRITERS: dict[str, Callable[[str, str, Scene], None]] = {"pascal_context": _write_pascal, "nyud": _write_nyud}


def generate(dataset: str, root: str, num_train: int, num_val: int, seed: int = 0, size: int = 112) -> dict[str, Any]:
    """Write a synthetic ``dataset`` in its on-disk layout under ``root``; returns the marker dict.

    ``size`` is the largest image height; heights vary in [0.75, 1] x size and widths in
    [0.85, 1.15] x size. The marker file ``SYNTHETIC.json`` is written last.
    """
    if dataset not in WRITERS:
        raise ValueError(f"unknown dataset '{dataset}'; valid: {sorted(WRITERS)}")
    root = str(root)
    os.makedirs(root, exist_ok=True)
    marker = os.path.join(root, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    if dataset == "pascal_context":
        os.makedirs(os.path.join(root, "db_info"), exist_ok=True)
        with open(os.path.join(root, "db_info", "context_classes.json"), "w") as f:
            json.dump(CONTEXT_IDS, f, indent=1, sort_keys=True)
        with open(os.path.join(root, "db_info", "nyu_classes.json"), "w") as f:
            json.dump(NYU_COMPATIBLE, f, indent=1)
    splits: dict[str, list[str]] = {}
    offset = 0
    for split, count in (("train", num_train), ("val", num_val)):
        ids = sample_ids(dataset, split, count, offset)
        offset += count
        objects: dict[str, list[int]] = {}
        for index, sample_id in enumerate(ids):
            scene = make_scene(dataset, seed, split, index, size)
            WRITERS[dataset](root, sample_id, scene)
            objects[sample_id] = sorted({o["class_ind"] for o in scene.objects})
        _write_split(root, dataset, split, ids, objects)
        splits[split] = ids
    info = {"dataset": dataset, "num_train": num_train, "num_val": num_val, "seed": seed, "size": size}
    atomic_write_text(marker, json.dumps(info, indent=1, sort_keys=True))  # last: a killed run is regenerated
    return info


def ensure_synthetic(dataset: str, root: str, num_train: int, num_val: int, seed: int = 0, size: int = 112) -> bool:
    """Generate unless ``root`` already holds this exact synthetic dataset; True if it generated."""
    marker = os.path.join(str(root), MARKER)
    wanted = {"dataset": dataset, "num_train": num_train, "num_val": num_val, "seed": seed, "size": size}
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == wanted:
                return False
    generate(dataset, root, num_train, num_val, seed, size)
    return True


def synthetic_shards(
    dataset: str,
    root: str,
    *,
    num_train: int,
    num_val: int,
    seed: int = 0,
    shard_size_mb: float = 1.0,
    make: bool = True,
) -> dict[str, str]:
    """``{split: shard folder}`` of a synthetic dataset under ``root/<dataset>``; with ``make``, the raw
    layout is generated and converted to shards on first use, and again when the settings change."""
    from mtlora_dist.data.ingest.convert import convert  # the generator stays importable without the converter

    base = os.path.abspath(os.path.join(root, dataset))
    raw = os.path.join(base, "raw")
    urls = {split: os.path.join(base, "shards", split) for split in ("train", "val")}
    if make:
        generated = ensure_synthetic(dataset, raw, num_train, num_val, seed)
        if generated or not all(os.path.isfile(os.path.join(u, "manifest.json")) for u in urls.values()):
            for split, url in urls.items():
                convert(dataset, raw, split, url, shard_size_mb=shard_size_mb)
    return urls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], prog="python -m mtlora_dist.synthetic.datasets"
    )
    parser.add_argument("--dataset", choices=sorted(WRITERS), required=True)
    parser.add_argument("--root", required=True, help="output folder (the dataset root)")
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=112, help="largest image height in pixels")
    args = parser.parse_args(argv)
    info = generate(args.dataset, args.root, args.num_train, args.num_val, args.seed, args.size)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
