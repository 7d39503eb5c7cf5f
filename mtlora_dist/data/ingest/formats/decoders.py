"""Label decoders of declared datasets: stored file -> canonical label (see ``formats/base.py``).

One entry per label kind decodes the common storage of that kind, driven by its
:class:`~mtlora_dist.data.ingest.format_spec.LabelFormat` (class ids with an id map and an ignore value, a
thresholded mask, an RGB-encoded or ``.npy`` direction, a scaled scalar with an invalid value). A
dataset whose storage needs more (Cityscapes disparity needs the camera of each image) adds a named
entry with :func:`register_decoder` and names it in its data config's ``decoder:``. Such modules import
this one, never the reverse: the package (``formats/__init__.py``) imports the built-in ones
(``cityscapes``), so their entries are registered whenever a decoder can be looked up.

A decoder gets the sample (:class:`DeclaredSample`: root, fields, image size) and the label's format
and returns the canonical array: class ids uint8 (255 = ignore), mask uint8 {0, 1} (255 = ignore),
unit vectors float32 HxWx3 (0 vector = invalid), scalar float32 HxW (0 = invalid).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtlora_dist.data.ingest.format_spec import LabelFormat
from mtlora_dist.data.ingest.formats.base import load_gray, load_npy, load_rgb, normalize_normals
from mtlora_dist.tasks.registry import IGNORE_INDEX

__all__ = ["DECODERS", "DeclaredSample", "Decoder", "register_decoder", "read_array", "decode_label"]


@dataclass
class DeclaredSample:
    """One sample of a declared dataset: where it is and what its pattern fields are."""

    root: str
    fields: dict[str, str]  # the image pattern's fields, and 'split'
    shape: tuple[int, int]  # the image's (H, W)
    cache: dict[str, Any] = field(default_factory=dict)

    def path(self, pattern: str) -> str:
        """``pattern`` (relative to the root) with this sample's fields filled in."""
        return os.path.join(self.root, pattern.format(**self.fields))


Decoder = Callable[[DeclaredSample, LabelFormat], np.ndarray]
DECODERS: dict[str, Decoder] = {}


def register_decoder(name: str) -> Callable[[Decoder], Decoder]:
    """Decorator: make ``fn`` available to data configs as ``decoder: <name>``."""

    def add(fn: Decoder) -> Decoder:
        if name in DECODERS and DECODERS[name] is not fn:
            raise ValueError(f"a label decoder named '{name}' is already registered")
        DECODERS[name] = fn
        return fn

    return add


def read_array(path: str, what: str) -> np.ndarray:
    """A label file as stored: ``.npy`` (never unpickled), else an image (palette indices stay indices,
    16-bit grayscale stays uint16, colour stays HxWx3). A trailing channel axis of 1 is dropped."""
    if path.endswith(".npy"):
        array = load_npy(path, what)
    else:
        from PIL import Image

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} not found: {path}")
        with Image.open(path) as im:
            colour, png = im.mode in ("RGB", "RGBA", "CMYK", "YCbCr"), im.format == "PNG"
        array = load_rgb(path) if colour else load_gray(path, what)
        if png and array.dtype == np.int32:  # Pillow releases differ: a 16-bit PNG may open as 32-bit 'I'
            array = array.astype(np.uint16)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _dtype_max(array: np.ndarray) -> float:
    return float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else 1.0


@register_decoder("class_map")
def class_map(sample: DeclaredSample, label: LabelFormat) -> np.ndarray:
    stored = read_array(sample.path(label.file), "class map").astype(np.int64)
    if stored.ndim != 2:
        raise ValueError(f"class map {sample.path(label.file)} must be single-channel, got shape {stored.shape}")
    ignore = np.zeros(stored.shape, dtype=bool) if label.ignore_value is None else stored == label.ignore_value
    if label.id_map:
        lut = np.full(max(int(stored.max(initial=0)), max(label.id_map)) + 1, IGNORE_INDEX, dtype=np.int64)
        for src, dst in label.id_map.items():
            lut[int(src)] = int(dst)
        ids = lut[np.clip(stored, 0, None)]
        ids[stored < 0] = IGNORE_INDEX
    else:
        ids = stored
    ids = np.where(ignore, IGNORE_INDEX, ids)
    bad = (ids != IGNORE_INDEX) & ((ids < 0) | (ids >= int(label.num_classes or 0)))
    if bad.any():
        raise ValueError(
            f"{sample.path(label.file)} holds class ids {sorted(np.unique(ids[bad]).tolist())[:10]} outside "
            f"0..{label.num_classes - 1}; set num_classes, ignore_value or id_map in the data config"
        )
    return ids.astype(np.uint8)


@register_decoder("binary_map")
def binary_map(sample: DeclaredSample, label: LabelFormat) -> np.ndarray:
    stored = read_array(sample.path(label.file), "binary map")
    if stored.ndim == 3:
        stored = stored.max(axis=-1)
    mask = (stored.astype(np.float64) / _dtype_max(stored) > label.positive_above).astype(np.uint8)
    if label.ignore_value is not None:
        mask[stored == label.ignore_value] = IGNORE_INDEX
    return mask


@register_decoder("unit_vector")
def unit_vector(sample: DeclaredSample, label: LabelFormat) -> np.ndarray:
    """``.npy`` HxWx3 as stored, or an RGB image with ``n = 2 v / max - 1``; ``decoder_args.invalid``
    (a stored RGB triple, e.g. [128, 128, 128]) marks pixels without a normal, as does a 0 vector."""
    stored = read_array(sample.path(label.file), "unit-vector field")
    if stored.ndim != 3 or stored.shape[-1] != 3:
        raise ValueError(f"{sample.path(label.file)} must be HxWx3, got shape {stored.shape}")
    vectors = stored.astype(np.float32)
    if np.issubdtype(stored.dtype, np.integer):
        vectors = 2.0 * vectors / _dtype_max(stored) - 1.0
    invalid = label.decoder_args.get("invalid")
    if invalid is not None:
        vectors[(stored == np.asarray(invalid, dtype=stored.dtype)).all(axis=-1)] = 0.0
    flip = label.decoder_args.get("flip")  # per-axis signs to convert the dataset's convention (x right, y down, z out)
    if flip is not None:
        vectors = vectors * np.asarray(flip, dtype=np.float32)
    return normalize_normals(np.nan_to_num(vectors))


@register_decoder("scalar")
def scalar(sample: DeclaredSample, label: LabelFormat) -> np.ndarray:
    stored = read_array(sample.path(label.file), "scalar field")
    if stored.ndim != 2:
        raise ValueError(f"scalar field {sample.path(label.file)} must be single-channel, got shape {stored.shape}")
    value = stored.astype(np.float32) * np.float32(label.scale)
    invalid = ~np.isfinite(value) | (value <= 0)
    if label.invalid_value is not None:
        invalid |= stored == label.invalid_value
    return np.where(invalid, 0.0, value).astype(np.float32)


def decode_label(sample: DeclaredSample, label: LabelFormat) -> np.ndarray:
    """The canonical label of ``sample`` for ``label`` with its decoder (default: the kind's)."""
    name = label.decoder or str(label.kind)
    try:
        decoder = DECODERS[name]
    except KeyError:
        raise ValueError(f"unknown label decoder '{name}'; registered decoders: {sorted(DECODERS)}") from None
    return decoder(sample, label)
