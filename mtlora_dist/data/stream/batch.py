"""The batch the trainer receives, and the image normalisation it applies on the device.

=============== ============================ =====================================================
key             dtype, shape                 meaning
=============== ============================ =====================================================
``image``       uint8 (B, 3, H, W)           RGB at the input size; :func:`normalize_image` on device
``semseg``,     uint8 (B, h, w)              class ids, 255 = ignore
``human_parts``
``sal``,        uint8 (B, h, w)              {0, 1}, 255 = ignore
``edge``
``normals``     float16 (B, 3, h, w)         unit vectors; ignored pixels 255 in all three channels
``depth``       float32 (B, h, w)            metres; ignored pixels 255
``label_size``  int64 (B, 2)                 each sample's true label (h, w) before padding
``valid``       bool (B,)                    False for padding copies (evaluation padding, or
                                             stand-ins for unreadable samples): metrics skip them
``labeled/<t>`` bool (B,)                    False where the sample has no label for task ``t``
                                             (partial labels): its target is all ignore, so its
                                             loss is 0 with 0 gradient, and metrics skip it
``__key__``     list[str]                    sample ids
=============== ============================ =====================================================

Labels are at the input size in training and under ``protocol="official"``; under
``protocol="original"`` they keep each image's size and are padded with 255 to the largest in the
batch (``label_size`` says how much of each is real). Tensors stay compact (uint8/float16) across
the worker -> main process queue: converting to float32 there costs more than the decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mtlora_dist.data.stream.transforms import warps_to_tensor
from mtlora_dist.tasks.registry import IGNORE_INDEX, labeled_key

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LABELED", "collate", "collate_decoded", "labeled", "normalize_image"]

LABELED = labeled_key("")  # batch key prefix: ``labeled/<task>`` says which samples have that task's label

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pad_stack(arrays: Sequence[np.ndarray], fill: float) -> np.ndarray:
    """Stack arrays whose last two dims may differ, padding bottom/right with ``fill``."""
    h = max(a.shape[-2] for a in arrays)
    w = max(a.shape[-1] for a in arrays)
    if all(a.shape[-2:] == (h, w) for a in arrays):
        return np.stack(arrays)
    out = np.full((len(arrays), *arrays[0].shape[:-2], h, w), fill, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, ..., : a.shape[-2], : a.shape[-1]] = a
    return out


def labeled(samples: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """``labeled/<task>``: which samples carry a label of each task (a sample without ``labeled`` has all)."""
    return {labeled_key(t): torch.tensor([bool(s.get("labeled", {}).get(t, True)) for s in samples]) for t in tasks}


def collate(samples: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """One batch from per-sample outputs of the transforms (see the module docstring)."""
    batch: dict[str, Any] = {"image": torch.from_numpy(np.stack([s["image"] for s in samples]))}
    for task in tasks:
        batch[task] = torch.from_numpy(_pad_stack([s[task] for s in samples], IGNORE_INDEX))
    batch.update(labeled(samples, tasks))
    batch["label_size"] = torch.tensor([s[tasks[0]].shape[-2:] for s in samples], dtype=torch.int64)
    batch["valid"] = torch.tensor([bool(s["valid"]) for s in samples], dtype=torch.bool)
    batch["__key__"] = [s["__key__"] for s in samples]
    return batch


def _pad_edge(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Stack (h, w, ...) arrays of different sizes into (B, H, W, ...), extending each by repeating its
    last row and column: bicubic taps past a sample's border then read what clamping would give."""
    h = max(a.shape[0] for a in arrays)
    w = max(a.shape[1] for a in arrays)
    out = np.empty((len(arrays), h, w, *arrays[0].shape[2:]), dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        ah, aw = a.shape[:2]
        out[i, :ah, :aw] = a
        out[i, :ah, aw:] = a[:, aw - 1 : aw]
        out[i, ah:] = out[i, ah - 1 : ah]
    return out


def collate_decoded(samples: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """A batch of decoded, not yet warped samples, for augmentation on the training device
    (``transforms.warp_batch``): fields padded by edge replication to the largest in the batch, with
    their true sizes (``image_hw``, ``label_hw``) and each sample's warp (``warp``, (B, 3))."""
    batch: dict[str, Any] = {"image": torch.from_numpy(_pad_edge([s["image"] for s in samples]))}
    for task in tasks:
        batch[task] = torch.from_numpy(_pad_edge([s[task] for s in samples]))
    batch.update(labeled(samples, tasks))
    batch["image_hw"] = torch.tensor([s["image"].shape[:2] for s in samples], dtype=torch.int64)
    batch["label_hw"] = torch.tensor([s["label_hw"] for s in samples], dtype=torch.int64)
    batch["warp"] = warps_to_tensor([s["warp"] for s in samples])
    batch["valid"] = torch.tensor([bool(s["valid"]) for s in samples], dtype=torch.bool)
    batch["__key__"] = [s["__key__"] for s in samples]
    return batch


def normalize_image(image: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float, computed on ``image``'s device."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype, device=image.device).view(1, 3, 1, 1)
    return (image.to(dtype) / 255.0 - mean) / std
