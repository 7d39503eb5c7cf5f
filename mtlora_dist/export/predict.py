"""Inference on one image: the evaluation loader's pre-processing, the model, and per-task decoding.

Decoding is keyed by the task's target kind in the registry (a task is data, not a branch):

=============  ======================================  ====================================
target kind    tasks                                   ``predict`` returns (at image size)
=============  ======================================  ====================================
class_map      semseg, human_parts                     class ids, uint8 (H, W) (int32 if K > 256)
binary_map     sal, edge                               probabilities, float32 (H, W)
normals        normals                                 unit vectors, float32 (H, W, 3): x right, y down, z to camera
depth          depth                                   metres, float32 (H, W)
=============  ======================================  ====================================

Logits are resized bilinearly to the image size before decoding, as the evaluator does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtlora_dist.data.stream.batch import normalize_image
from mtlora_dist.data.stream.transforms import Warp, warp_sample
from mtlora_dist.tasks.registry import get_task

__all__ = ["decode", "predict", "resize_image"]


def _class_ids(logits: Tensor) -> Tensor:
    return logits.argmax(-3).to(torch.uint8 if logits.shape[-3] <= 256 else torch.int32)


def _unit_vectors(logits: Tensor) -> Tensor:
    return F.normalize(logits.float(), dim=-3).movedim(-3, -1)


_DECODERS: dict[str, Callable[[Tensor], Tensor]] = {
    "class_map": _class_ids,
    "binary_map": lambda logits: torch.sigmoid(logits.float()[..., 0, :, :]),
    "normals": _unit_vectors,
    "depth": lambda logits: logits.float()[..., 0, :, :],
}


def decode(task: str, logits: Tensor) -> np.ndarray:
    """Logits (..., K, H, W) of ``task`` -> its prediction map as a numpy array (see the module table)."""
    return _DECODERS[get_task(task).target_kind](logits.detach()).cpu().numpy()


def _as_rgb(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 RGB array or a PIL image, got {image.dtype} {image.shape}")
    return image


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (3, h, w) at ``size``, exactly as the evaluation loader resizes images."""
    return warp_sample({"__key__": "", "image": image}, (), tuple(size), Warp())["image"]


@torch.no_grad()
def predict(model, image) -> dict[str, np.ndarray]:
    """``{task: map}`` for one image (uint8 HxWx3 numpy array or PIL image), maps at the image's size.

    ``model`` is what :func:`mtlora_dist.export.load` returns (it knows its input size and tasks).
    """
    array = _as_rgb(image)
    param = next(model.parameters())
    x = torch.from_numpy(resize_image(array, model.img_size))[None].to(param.device)
    logits = model(normalize_image(x, param.dtype))
    size = array.shape[:2]
    return {
        task: decode(task, F.interpolate(out.float(), size=size, mode="bilinear", align_corners=False)[0])
        for task, out in logits.items()
    }
