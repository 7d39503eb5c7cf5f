"""Synthetic Cityscapes and Taskonomy trees in their real on-disk layouts (no download), for the declared
formats of ``configs/data/cityscapes.yaml`` and ``configs/data/taskonomy.yaml``.

The files are what the real datasets ship, byte format included, so conversion runs the same decoders:

* Cityscapes: ``leftImg8bit/<split>/<city>/<frame>_leftImg8bit.png`` (RGB), ``gtFine/.../<frame>_gtFine_labelIds.png``
  (8-bit labelIds, void ids included), ``disparity/.../<frame>_disparity.png`` (16-bit, ``p = 256 d + 1``,
  0 = none) and ``camera/.../<frame>_camera.json`` (a camera per city, scaled to the image width);
* Taskonomy: ``<building>/{rgb,normal,depth_zbuffer,edge_texture,segment_semantic}/point_<p>_view_<v>_domain_*.png``
  (normals RGB 8-bit with x to the left and y up, (128,128,128) = no surface; depth 16-bit in 1/512 m, 65535 =
  no surface; edges the 16-bit Sobel magnitude of the blurred grey image; semantics 0 uncertain, 1 background,
  2..17 objects) and ``splits/<split>.txt`` listing buildings. ``missing`` leaves some label files out.

Labels follow the image (class = colour, depth = haze and size on the ground plane, normals = shading,
edges = the image's own gradients), so a tiny model's losses fall within a few steps. Deterministic by seed.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from mtlora_dist.synthetic.datasets import _bumps, _Canvas, _hsv
from mtlora_dist.tasks.registry import IGNORE_INDEX

__all__ = [
    "LayoutTree",
    "CityscapesScene",
    "TaskonomyScene",
    "CITYSCAPES_TRAIN_IDS",
    "CITYSCAPES_COLOURS",
    "TASKONOMY_COLOURS",
    "TASKONOMY_CLASSES",
    "TASKONOMY_TASK_DOMAINS",
    "cityscapes_scene",
    "taskonomy_scene",
    "make_cityscapes_tree",
    "make_taskonomy_tree",
    "sobel_magnitude",
]

# labelId -> trainId of the 19 evaluated Cityscapes classes (every other labelId is ignored)
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
CITYSCAPES_CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt", "lindau"), "test": ("berlin",)}
FULL_WIDTH, FULL_FX, FULL_BASELINE = 2048, 2262.52, 0.209313  # the real camera at full resolution
CAMERA_HEIGHT = 1.22  # metres above the road
TASKONOMY_TASK_DOMAINS = {  # our task -> (folder, file domain) of a Taskonomy building
    "semseg": ("segment_semantic", "segmentsemantic"),
    "normals": ("normal", "normal"),
    "depth": ("depth_zbuffer", "depth_zbuffer"),
    "edge": ("edge_texture", "edge_texture"),
}
TASKONOMY_INVALID_NORMAL = (128, 128, 128)
TASKONOMY_DEPTH_UNITS = 512.0  # stored = metres * 512; 65535 = no surface
EDGE_SIGMA = 1.0  # blur of the synthetic edge maps (Taskonomy's 512 px images: 3; ours are ~8x smaller)


@dataclass
class LayoutTree:
    """What a generator wrote: sample keys per split (as the declared reader names them, sorted), the keys
    whose label file was left out per task, and (``keep_labels``) each sample's canonical labels."""

    root: str
    samples: dict[str, list[str]]
    missing: dict[str, list[str]] = field(default_factory=dict)
    files: int = 0
    labels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _rng(seed: int, *parts: str | int) -> np.random.Generator:
    words = [seed] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return np.random.default_rng(np.random.SeedSequence(words))


def _save(path: str, array: np.ndarray) -> None:
    """A PNG as the datasets store it: RGB, 8-bit grey, or 16-bit grey (PIL mode I;16)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def sobel_magnitude(grey: np.ndarray, sigma: float) -> np.ndarray:
    """Taskonomy's texture-edge strength of a grey image in [0, 1]: Gaussian blur, then the Sobel magnitude
    ``sqrt((h^2 + v^2) / 2)`` with kernels summing to 1 along the edge (scikit-image's ``filters.sobel``)."""
    smooth = ndimage.gaussian_filter(grey.astype(np.float64), sigma, mode="constant")
    h = ndimage.sobel(smooth, axis=0, mode="reflect") / 4.0
    v = ndimage.sobel(smooth, axis=1, mode="reflect") / 4.0
    return np.sqrt((h * h + v * v) / 2.0)


# ---------------------------------------------------------------------------------------------- Cityscapes


@dataclass
class CityscapesScene:
    """One street scene: the image, what Cityscapes stores, and the canonical labels a decoder must return."""

    image: np.ndarray  # uint8 HxWx3
    label_ids: np.ndarray  # uint8 HxW, Cityscapes labelIds (void ids included)
    disparity: np.ndarray  # uint16 HxW, stored p (0 = none)
    depth: np.ndarray  # float32 HxW, metres the disparity was made from (0 = none)
    camera: dict

    @property
    def train_ids(self) -> np.ndarray:
        lut = np.full(256, IGNORE_INDEX, np.uint8)
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            lut[label_id] = train_id
        return lut[self.label_ids]


# image colour of each labelId: classes differ in hue, so colour alone tells them apart (brightness carries depth)
CITYSCAPES_COLOURS = {
    label_id: _hsv(i * 7 % 19 / 19, 0.85 if i % 2 else 0.6, 0.9) for i, label_id in enumerate(CITYSCAPES_TRAIN_IDS)
}
CITYSCAPES_COLOURS.update({0: _hsv(0.0, 0.0, 0.35), 1: _hsv(0.0, 0.0, 0.1), 6: _hsv(0.1, 0.3, 0.5)})


def _city_camera(city: str, width: int) -> dict:
    """A Cityscapes camera file for ``city`` (each city its own focal length and baseline), scaled to ``width``."""
    k = zlib.crc32(city.encode()) % 7
    scale = width / FULL_WIDTH
    fx = (FULL_FX + 3.1 * k) * scale
    return {
        "extrinsic": {"baseline": round(FULL_BASELINE + 0.002 * k, 6), "pitch": 0.038, "roll": 0.0, "x": 1.7,
                      "y": 0.1, "yaw": -0.0195, "z": CAMERA_HEIGHT},
        "intrinsic": {"fx": fx, "fy": fx * 1.0012, "u0": width / 2, "v0": 0.5 * width / 2},
    }  # fmt: skip


def _paint(
    c: _Canvas, mask: np.ndarray, label_id: int, depth: np.ndarray | float, height: np.ndarray | None = None
) -> None:
    flat = np.zeros((c.h, c.w), np.float32)
    c.paint(mask, flat if height is None else height, CITYSCAPES_COLOURS[label_id], 0, label_id, depth=depth)


def _street(c: _Canvas, rng: np.random.Generator, fx: float) -> None:
    """Sky, buildings or trees, road and sidewalks on a ground plane, then cars, people, a pole with a sign."""
    h, w = c.h, c.w
    horizon = rng.uniform(0.40, 0.5) * h
    below = c.yy > horizon + 0.5
    ground = np.where(below, fx * CAMERA_HEIGHT / np.maximum(c.yy - horizon, 1e-3), 0.0).astype(np.float32)
    _paint(c, ~below, 23, 0.0)  # sky: no disparity
    x = 0.0
    while x < w:
        width = rng.uniform(w / 8, w / 3)
        top = rng.uniform(0.05, 0.35) * h
        block = (c.xx >= x) & (c.xx < x + width) & (c.yy >= top) & ~below
        label_id = int(rng.choice([11, 11, 21, 12]))
        height = _bumps(c, rng, 0.02 * w) if label_id == 21 else None
        _paint(c, block, label_id, float(rng.uniform(14.0, 45.0)), height)
        x += width
    half = (0.08 + 0.4 * np.clip((c.yy - horizon) / max(h - horizon, 1.0), 0, 1)) * w
    road = below & (np.abs(c.xx - w / 2) <= half)
    _paint(c, road, 7, ground)
    _paint(c, below & ~road, int(rng.choice([8, 8, 22, 6])), ground)  # 6: ground (void)
    things = [26] * int(rng.integers(1, 4)) + [24] * int(rng.integers(0, 3)) + [17]
    rng.shuffle(things)
    for label_id in things:
        _thing(c, rng, label_id, horizon, fx)
    ego = c.yy > 0.93 * h
    _paint(c, ego, 1, 0.0)  # ego vehicle: void, no disparity


def _thing(c: _Canvas, rng: np.random.Generator, label_id: int, horizon: float, fx: float) -> None:
    """A car, a person or a pole (with a traffic sign) standing on the ground plane: size and depth agree."""
    h, w = c.h, c.w
    foot = rng.uniform(horizon + 0.12 * (h - horizon), 0.92 * h)
    depth = fx * CAMERA_HEIGHT / (foot - horizon)
    size = {26: (1.5, 1.8 * rng.uniform(1.0, 2.3)), 24: (1.75, 0.55), 17: (5.0, 0.25)}[label_id]  # metres (h, w)
    ph, pw = fx * size[0] / depth, max(fx * size[1] / depth, 1.0)
    cx = rng.uniform(0.05 * w, 0.95 * w)
    mask, height = c.box(cx - pw / 2, foot - ph, cx + pw / 2, foot)
    _paint(c, mask, label_id, depth, height)
    if label_id == 17:  # a traffic sign on the pole
        sign, _ = c.box(cx - 1.5 * pw, foot - ph, cx + 1.5 * pw, foot - ph + max(ph / 6, 2.0))
        _paint(c, sign, 20, depth)


def _stored_disparity(depth: np.ndarray, baseline: float, fx: float) -> np.ndarray:
    """Cityscapes' 16-bit encoding of the disparity ``baseline * fx / depth``: ``p = 256 d + 1``, 0 = none."""
    valid = depth > 0
    d = np.where(valid, baseline * fx / np.where(valid, depth, 1.0), 0.0)
    return np.where(valid, np.clip(np.rint(d * 256.0) + 1, 2, 65535), 0).astype(np.uint16)


def cityscapes_scene(
    seed: int, split: str, index: int, city: str, size: tuple[int, int] = (64, 128)
) -> CityscapesScene:
    """The scene of sample ``index`` of ``split`` in ``city``: a pure function of its arguments."""
    rng = _rng(seed, "cityscapes", split, index)
    c = _Canvas(*size)
    camera = _city_camera(city, size[1])
    fx, baseline = camera["intrinsic"]["fx"], camera["extrinsic"]["baseline"]
    _street(c, rng, fx)
    label_ids = c.region.astype(np.uint8)
    depth = c.depth.copy()
    y, x = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] - 8))
    label_ids[y : y + 4, x : x + 8] = 0  # an unlabeled patch
    y, x = int(rng.integers(size[0] // 2, size[0] - 4)), int(rng.integers(0, size[1] - 8))
    depth[y : y + 4, x : x + 8] = 0.0  # a stereo hole
    haze = np.where(depth > 0, np.clip(1.15 - depth / 60.0, 0.45, 1.15), 1.0)
    return CityscapesScene(c.shade(rng, haze), label_ids, _stored_disparity(depth, baseline, fx), depth, camera)


def make_cityscapes_tree(
    root: str | os.PathLike,
    splits: Mapping[str, int] | None = None,
    size: tuple[int, int] = (64, 128),
    seed: int = 0,
    keep_labels: bool = False,
) -> LayoutTree:
    """Write ``splits[split]`` Cityscapes samples per split (spread over the split's cities) under ``root``.

    ``size``: (H, W) of every image (real: 1024 x 2048). ``keep_labels``: also return each sample's canonical
    labels (``semseg`` train ids, ``depth`` metres before quantisation), for checking decoders against them.
    """
    root = str(root)
    splits = dict(splits or {"train": 8, "val": 4})
    tree = LayoutTree(root, {})
    for split, count in splits.items():
        cities = CITYSCAPES_CITIES.get(split, (f"{split}city",))
        keys = []
        for index in range(count):
            city = cities[index % len(cities)]
            frame = f"{city}_{index // len(cities):06d}_{19 + 7 * index:06d}"
            scene = cityscapes_scene(seed, split, index, city, size)
            where = f"{split}/{city}/{frame}"
            _save(os.path.join(root, "leftImg8bit", f"{where}_leftImg8bit.png"), scene.image)
            _save(os.path.join(root, "gtFine", f"{where}_gtFine_labelIds.png"), scene.label_ids)
            _save(os.path.join(root, "disparity", f"{where}_disparity.png"), scene.disparity)
            _write_text(os.path.join(root, "camera", f"{where}_camera.json"), json.dumps(scene.camera, indent=2))
            tree.files += 4
            key = f"{city}__{frame}"
            keys.append(key)
            if keep_labels:
                tree.labels[key] = {"semseg": scene.train_ids, "depth": scene.depth}
        tree.samples[split] = sorted(keys)
    return tree


# ----------------------------------------------------------------------------------------------- Taskonomy

# taskonomy's coco_selected_classes.txt: the classes of stored ids 1 (background) .. 17 (vase); 0 = uncertain
TASKONOMY_CLASSES = ("background", "bottle", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
                     "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase")  # fmt: skip
# image colour of each stored object class (2..17); wall and floor are greyish
TASKONOMY_COLOURS = {
    stored: _hsv(i * 5 % 16 / 16, 0.9 if i % 2 else 0.65, 0.95) for i, stored in enumerate(range(2, 18))
}
DEFAULT_BUILDINGS = {"train": ("allensville", "beechwood"), "val": ("collierville",)}


@dataclass
class TaskonomyScene:
    """One indoor view: the image, what Taskonomy stores per domain, and the canonical labels."""

    image: np.ndarray  # uint8 HxWx3
    stored: dict[str, np.ndarray]  # task -> the array written to that task's PNG
    labels: dict[str, np.ndarray]  # task -> canonical label (semseg ids, normals ours, depth m); edge: magnitude


def _room(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Wall and floor (background), then 1-3 objects of the 16 classes; returns the stored semantic ids."""
    h, w = c.h, c.w
    horizon = rng.uniform(0.45, 0.65) * h
    wall_depth = rng.uniform(3.0, 6.0)
    upper = c.yy < horizon
    c.paint(upper, _bumps(c, rng, 0.03 * w), _hsv(0.1, 0.12, rng.uniform(0.7, 0.9)), 1, 1, depth=wall_depth)
    frac = np.clip((c.yy - horizon) / max(h - horizon, 1.0), 0.0, 1.0)
    floor = 0.8 * (c.yy - horizon)
    c.paint(~upper, floor, _hsv(0.07, 0.3, 0.5), 1, 1, depth=wall_depth + frac * (1.0 - wall_depth))
    ids = np.ones((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        stored = int(rng.integers(2, 18))
        rx, ry = rng.uniform(0.1, 0.22) * w, rng.uniform(0.1, 0.22) * h
        cx, cy = rng.uniform(rx, w - rx), rng.uniform(ry, h - ry)
        mask, height = c.ellipse(cx, cy, rx, ry) if rng.random() < 0.5 else c.box(cx - rx, cy - ry, cx + rx, cy + ry)
        distance = rng.uniform(1.2, wall_depth - 0.5)
        c.paint(
            mask, height, TASKONOMY_COLOURS[stored], 0, stored, depth=distance - height / max(height.max(), 1e-3) * 0.3
        )
        ids[mask] = stored
        ring = ndimage.binary_dilation(mask, iterations=1) & ~mask
        ids[ring] = 0  # the distilled labels are uncertain along object borders
    return ids


def taskonomy_scene(seed: int, building: str, point: int, view: int, size: int = 64) -> TaskonomyScene:
    """The view ``(point, view)`` of ``building``: a pure function of its arguments."""
    rng = _rng(seed, "taskonomy", building, point, view)
    c = _Canvas(size, size)
    ids = _room(c, rng)
    hole = np.zeros((size, size), bool)
    y, x = int(rng.integers(0, size - 6)), int(rng.integers(0, size - 6))
    dy, dx = int(rng.integers(3, 7)), int(rng.integers(3, 7))
    hole[y : y + dy, x : x + dx] = True  # a mesh hole
    c.colour[hole] = 0.02
    ids[hole] = 0
    image = c.shade(rng, np.clip(1.2 - 0.08 * c.depth, 0.6, 1.1))
    normals = np.where(hole[..., None], 0.0, c.normals).astype(np.float32)
    depth = np.where(hole, 0.0, c.depth).astype(np.float32)
    taskonomy_normals = c.normals * np.array([-1.0, -1.0, 1.0], np.float32)  # stored: x left, y up, z to camera
    normal_png = np.clip(np.rint((taskonomy_normals + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
    normal_png[hole] = TASKONOMY_INVALID_NORMAL
    depth_png = np.where(hole, 65535, np.clip(np.rint(depth * TASKONOMY_DEPTH_UNITS), 1, 65534)).astype(np.uint16)
    grey = np.asarray(Image.fromarray(image).convert("L"), np.float64) / 255.0
    magnitude = sobel_magnitude(grey, EDGE_SIGMA)
    edge_png = np.clip(np.rint(magnitude * 65535.0), 0, 65535).astype(np.uint16)
    semseg = np.where(ids == 0, IGNORE_INDEX, ids.astype(np.int32) - 1).astype(np.uint8)
    return TaskonomyScene(
        image,
        {"semseg": ids, "normals": normal_png, "depth": depth_png, "edge": edge_png},
        {"semseg": semseg, "normals": normals, "depth": depth, "edge": edge_png.astype(np.float64) / 65535.0},
    )


def _views(rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
    """``count`` distinct (point, view) pairs, a few views per point as in the real data."""
    pairs: list[tuple[int, int]] = []
    while len(pairs) < count:
        point = int(rng.integers(0, 2000))
        for view in sorted(rng.choice(8, size=int(rng.integers(1, 4)), replace=False).tolist()):
            if len(pairs) < count and (point, view) not in pairs:
                pairs.append((point, view))
    return pairs


def make_taskonomy_tree(
    root: str | os.PathLike,
    buildings: Mapping[str, Sequence[str]] | None = None,
    per_building: int = 4,
    size: int = 64,
    seed: int = 0,
    missing: Mapping[str, float] | None = None,
    keep_labels: bool = False,
) -> LayoutTree:
    """Write ``per_building`` views of every building under ``root`` and ``splits/<split>.txt`` per split.

    ``buildings``: split -> building names (default: two training buildings, one validation building).
    ``missing``: task (``semseg``, ``normals``, ``depth``, ``edge``) -> fraction of views whose file of that
    domain is not written (at least one view per task when the fraction is above 0), as real Taskonomy
    lacks some domains for some views. ``keep_labels``: also return each sample's canonical labels.
    """
    root = str(root)
    buildings = {s: list(b) for s, b in (buildings or DEFAULT_BUILDINGS).items()}
    missing = dict(missing or {})
    unknown = sorted(set(missing) - set(TASKONOMY_TASK_DOMAINS))
    if unknown:
        raise ValueError(f"missing names unknown task(s) {unknown}; tasks: {sorted(TASKONOMY_TASK_DOMAINS)}")
    tree = LayoutTree(root, {}, {task: [] for task in missing})
    for split, names in buildings.items():
        _write_text(os.path.join(root, "splits", f"{split}.txt"), "".join(f"{b}\n" for b in names))
        tree.files += 1
        keys = []
        for building in names:
            for point, view in _views(_rng(seed, "views", building), per_building):
                key = f"{building}__{point}__{view}"
                keys.append(key)
                scene = taskonomy_scene(seed, building, point, view, size)
                tree.files += _write_view(root, tree, key, scene, missing, seed)
                if keep_labels:
                    tree.labels[key] = scene.labels
        tree.samples[split] = sorted(keys)
    for task, fraction in missing.items():  # a fraction above 0 leaves at least one file out
        if fraction > 0 and not tree.missing[task]:
            key = tree.samples[next(iter(tree.samples))][0]
            os.remove(_taskonomy_path(root, key, task))
            tree.missing[task].append(key)
            tree.files -= 1
    tree.missing = {task: sorted(keys) for task, keys in tree.missing.items()}
    return tree


def _taskonomy_path(root: str, key: str, task: str) -> str:
    building, point, view = key.split("__")
    folder, domain = ("rgb", "rgb") if task == "rgb" else TASKONOMY_TASK_DOMAINS[task]
    return os.path.join(root, building, folder, f"point_{point}_view_{view}_domain_{domain}.png")


def _write_view(
    root: str, tree: LayoutTree, key: str, scene: TaskonomyScene, missing: Mapping[str, float], seed: int
) -> int:
    """Write one view's image and labels (leaving out the ones ``missing`` draws); returns the files written."""
    _save(_taskonomy_path(root, key, "rgb"), scene.image)
    written = 1
    rng = _rng(seed, "missing", key)
    for task, array in scene.stored.items():
        if rng.random() < missing.get(task, 0.0):
            tree.missing[task].append(key)
            continue
        _save(_taskonomy_path(root, key, task), array)
        written += 1
    return written
