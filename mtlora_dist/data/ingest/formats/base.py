"""One reader for every dataset layout on disk, parameterised by per-task loaders.

A dataset module (``pascal_context``, ``nyud``) says where its split files and images are and how to
load each task's label; :class:`LayoutReader` does the rest the same way for all of them: list ids,
check that files exist, load the selected tasks, check shapes and return the canonical sample::

    {"__key__": id, "image": uint8 HxWx3, "semseg": uint8 HxW (255 ignore), "human_parts": uint8 HxW,
     "sal": uint8 HxW {0,1}, "normals": float32 HxWx3 unit vectors (0 vector = invalid),
     "edge": uint8 HxW {0,1}, "depth": float32 HxW metres (0 = invalid)}

with only the tasks asked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from mtlora_dist.tasks.registry import DATASET_TASKS, check_tasks, get_task

__all__ = [
    "SampleFiles",
    "LayoutReader",
    "load_rgb",
    "load_gray",
    "load_npy",
    "normalize_normals",
    "resize_label",
]

log = logging.getLogger("mtlora_dist")


@dataclass
class SampleFiles:
    """What a task loader gets: the dataset root, the sample id, the image size and a per-sample cache.

    The cache lets two tasks share one expensive read (PASCAL-Context's ``LabelMap`` feeds both the
    edges and the normals validity mask).
    """

    root: str
    id: str
    shape: tuple[int, int]  # the image's (H, W): every label must match it
    cache: dict[str, Any] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def once(self, name: str, load: Callable[[], Any]) -> Any:
        if name not in self.cache:
            self.cache[name] = load()
        return self.cache[name]


TaskLoader = Callable[[SampleFiles], np.ndarray]


def _require(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_rgb(path: str) -> np.ndarray:
    """uint8 HxWx3 image (grayscale or palette images are converted)."""
    with Image.open(_require(path, "image")) as im:
        return np.asarray(im.convert("RGB"))


def load_gray(path: str, what: str) -> np.ndarray:
    """A single-channel PNG as stored (palette indices stay indices, RGB is converted to luminance)."""
    with Image.open(_require(path, what)) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            im = im.convert("L")
        return np.asarray(im)


def load_npy(path: str, what: str) -> np.ndarray:
    """A ``.npy`` array, never unpickling objects."""
    return np.load(_require(path, what), allow_pickle=False)


def normalize_normals(normals: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Unit vectors (float32 HxWx3); vectors shorter than ``eps`` become the 0 vector (= invalid)."""
    n = np.asarray(normals, dtype=np.float32)
    norm = np.sqrt((n * n).sum(axis=-1, keepdims=True))
    valid = norm > eps
    return np.where(valid, n / np.where(valid, norm, 1.0), 0.0).astype(np.float32)


def resize_label(value: np.ndarray, shape: tuple[int, int], task: str) -> np.ndarray:
    """``value`` at ``shape`` (H, W) as the official PASCAL reader resizes a label of another size than its
    image: OpenCV nearest for ids and maps, cubic for normals (renormalised here: 0 stays invalid)."""
    import cv2

    size = (shape[1], shape[0])
    if get_task(task).interpolation == "normals":
        valid = cv2.resize((np.abs(value).sum(-1) > 0).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        resized = cv2.resize(value.astype(np.float32), size, interpolation=cv2.INTER_CUBIC)
        return normalize_normals(np.where(valid[..., None] > 0, resized, 0.0))
    return cv2.resize(value, size, interpolation=cv2.INTER_NEAREST)


class LayoutReader:
    """Reads canonical samples of one dataset layout; see the module docstring for the format.

    Args:
        dataset: dataset name (a key of ``DATASET_TASKS``).
        root: dataset root folder.
        tasks: tasks to load (default: all tasks of the dataset).
        split_file: ``split -> path relative to root`` of the file listing that split's ids.
        image_file: ``id -> path relative to root`` of the image.
        loaders: ``task -> loader``; a loader returns the task's canonical array.
        resize_labels: resize a label of another size than its image (:func:`resize_label`, one warning
            per sample in the conversion log) instead of refusing it; the official PASCAL reader does.
    """

    def __init__(
        self,
        dataset: str,
        root: str,
        tasks: list[str] | tuple[str, ...] | None,
        *,
        split_file: Callable[[str], str],
        image_file: Callable[[str], str],
        loaders: Mapping[str, TaskLoader],
        resize_labels: bool = False,
    ) -> None:
        self.dataset = dataset
        self.root = str(root)
        self.tasks = tuple(tasks) if tasks else DATASET_TASKS[dataset]
        check_tasks(dataset, self.tasks)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"{dataset} root folder not found: {self.root}")
        self._split_file = split_file
        self._image_file = image_file
        self._loaders = dict(loaders)
        self.resize_labels = resize_labels
        self.optional_tasks: tuple[str, ...] = ()  # built-in layouts have every label of every sample

    def ids(self, split: str) -> list[str]:
        """Sample ids of ``split`` in file order (one per line, blank lines ignored)."""
        path = os.path.join(self.root, self._split_file(split))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"split file for '{split}' not found: {path}")
        with open(path) as f:
            ids = [line.strip() for line in f if line.strip()]
        bad = [i for i in ids if "." in i or "/" in i]
        if bad:
            raise ValueError(f"ids must not contain '.' or '/' (they become tar keys): {bad[:5]} in {path}")
        return ids

    def image_path(self, sample_id: str) -> str:
        return os.path.join(self.root, self._image_file(sample_id))

    def read(self, sample_id: str) -> dict[str, Any]:
        """The canonical sample of ``sample_id`` with the reader's tasks."""
        image = load_rgb(self.image_path(sample_id))
        h, w = image.shape[:2]
        files = SampleFiles(self.root, sample_id, (h, w))
        sample: dict[str, Any] = {"__key__": sample_id, "image": image}
        for task in self.tasks:
            value = self._loaders[task](files)
            if value.shape[:2] != (h, w):
                message = (
                    f"{self.dataset} sample {sample_id}: '{task}' label is {value.shape[:2]} but the image is {(h, w)}"
                )
                if not self.resize_labels:
                    raise ValueError(f"{message}; labels must have the image's size")
                log.warning("%s: resized to the image, as the official reader does (label resized)", message)
                value = resize_label(value, (h, w), task)
            sample[task] = value
        return sample
