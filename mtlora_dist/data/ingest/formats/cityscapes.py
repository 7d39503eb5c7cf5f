"""Cityscapes depth: the stereo disparity maps turned into metres with each image's own camera.

Cityscapes ships ``disparity/<split>/<city>/<frame>_disparity.png`` (16-bit grayscale; a stored value
``p = 0`` is no measurement, else the disparity is ``d = (p - 1) / 256`` pixels) and
``camera/<split>/<city>/<frame>_camera.json`` (``extrinsic.baseline`` in metres, ``intrinsic.fx`` in
pixels). Depth is ``baseline * fx / d``; ``d <= 0`` has no depth. The camera is read per image: it
differs between cities and recording days, so one constant would put whole cities at the wrong scale.

The data config names the decoder and the camera pattern (``configs/data/cityscapes.yaml``)::

    depth:
      kind: scalar
      units: m
      file: disparity/{split}/{city}/{frame}_disparity.png
      decoder: cityscapes_disparity
      decoder_args: {camera: "camera/{split}/{city}/{frame}_camera.json", max_depth: 80.0}

``max_depth`` (optional, metres): depths beyond it are marked invalid (0) rather than kept. Depth grows
as 1/d, so at small disparities a fraction of a pixel of matching error is tens of metres (the smallest
stored disparity, 1/256 px, means 121 km at full resolution); a far cut keeps a few such pixels from
ruling an L1 loss and the rmse.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from mtlora_dist.data.ingest.format_spec import LabelFormat, pattern_fields
from mtlora_dist.data.ingest.formats.decoders import DeclaredSample, read_array, register_decoder

__all__ = ["DISPARITY_SCALE", "disparity_to_depth", "read_camera", "cityscapes_disparity"]

DISPARITY_SCALE = 256.0  # stored p -> disparity (p - 1) / 256 pixels; p = 0: no measurement
_ARGS = {"camera", "max_depth"}
_NAME = "cityscapes_disparity"


def disparity_to_depth(stored: np.ndarray, baseline: float, fx: float, max_depth: float | None = None) -> np.ndarray:
    """Depth in metres (float32, 0 = none) of a stored Cityscapes disparity map.

    ``p = 0`` and ``p = 1`` (disparity 0) have no depth; so has any depth above ``max_depth``.
    """
    p = np.asarray(stored).astype(np.float64)
    disparity = (p - 1.0) / DISPARITY_SCALE
    valid = (p > 0) & (disparity > 0)
    depth = np.zeros(p.shape, dtype=np.float64)
    depth[valid] = baseline * fx / disparity[valid]
    if max_depth is not None:
        depth[depth > max_depth] = 0.0
    return depth.astype(np.float32)


def read_camera(path: str) -> tuple[float, float]:
    """``(baseline in metres, fx in pixels)`` from a Cityscapes ``*_camera.json``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Cityscapes camera file not found: {path} (the depth of an image needs its camera)")
    try:
        with open(path) as f:
            camera = json.load(f)
        baseline, fx = float(camera["extrinsic"]["baseline"]), float(camera["intrinsic"]["fx"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path} is not a Cityscapes camera file: it needs numbers at extrinsic.baseline and intrinsic.fx ({err!r})"
        ) from None
    if not (math.isfinite(baseline) and math.isfinite(fx) and baseline > 0 and fx > 0):
        raise ValueError(f"{path}: extrinsic.baseline ({baseline}) and intrinsic.fx ({fx}) must be positive")
    return baseline, fx


def _args(label: LabelFormat) -> tuple[str, float | None]:
    """The decoder's arguments, checked: the camera pattern and the optional far cut."""
    args: dict[str, Any] = dict(label.decoder_args or {})
    unknown = sorted(set(args) - _ARGS)
    if unknown:
        raise ValueError(f"decoder '{_NAME}' got unknown decoder_args {unknown}; it takes {sorted(_ARGS)}")
    camera = args.get("camera")
    if not camera:
        raise ValueError(
            f"decoder '{_NAME}' needs decoder_args.camera, the camera file pattern, e.g. "
            "camera/{split}/{city}/{frame}_camera.json"
        )
    max_depth = args.get("max_depth")
    if max_depth is not None and not float(max_depth) > 0:
        raise ValueError(f"decoder '{_NAME}': decoder_args.max_depth must be > 0 metres, got {max_depth}")
    return str(camera), None if max_depth is None else float(max_depth)


def _camera_path(sample: DeclaredSample, pattern: str) -> str:
    missing = sorted(set(pattern_fields(pattern)) - set(sample.fields))
    if missing:
        raise ValueError(
            f"decoder '{_NAME}': the camera pattern '{pattern}' uses field(s) {missing} that the image pattern "
            f"does not define; available: {sorted(sample.fields)}"
        )
    return sample.path(pattern)


@register_decoder(_NAME)
def cityscapes_disparity(sample: DeclaredSample, label: LabelFormat) -> np.ndarray:
    """Depth in metres (0 = none) from the sample's disparity PNG and camera JSON."""
    camera, max_depth = _args(label)
    path = sample.path(label.file)
    stored = read_array(path, "Cityscapes disparity map")
    if stored.ndim == 3 and stored.shape[-1] == 1:  # only a channel axis: a 1-pixel-high map stays 2-D
        stored = stored[..., 0]
    if stored.ndim != 2 or not np.issubdtype(stored.dtype, np.integer) or stored.dtype.itemsize < 2:
        raise ValueError(
            f"{path} must be a 16-bit single-channel PNG (Cityscapes disparity), got {stored.dtype} {stored.shape}"
        )
    baseline, fx = read_camera(_camera_path(sample, camera))
    return disparity_to_depth(stored, baseline, fx, max_depth)
