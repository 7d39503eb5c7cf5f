"""How a canonical sample is stored in a shard: one tar member per field, deterministic encoders.

Encoding version 1 (written into every manifest):

============== =========================== =====================================================
field          member name                 encoding
============== =========================== =====================================================
image          ``<key>.jpg``               JPEG; the source file's bytes when it already is an RGB
                                           JPEG (no second lossy pass), else quality 95
class maps     ``<key>.<task>.png``        8-bit grayscale PNG of the ids (``semseg``,
                                           ``human_parts``), 255 = ignore
binary maps    ``<key>.<task>.png``        8-bit grayscale PNG of {0,1} (``sal``, ``edge``)
normals        ``<key>.normals.npy``       float16 HxWx3 ``.npy``, unit vectors, 0 vector = invalid
depth          ``<key>.depth.npy``         float32 HxW ``.npy``, metres, 0 = invalid
============== =========================== =====================================================

Why float16 ``.npy`` for normals: PIL cannot write 16-bit colour PNGs, PIL silently cuts 16-bit PNGs to
8 bits when reading, and torchvision's 16-bit PNG decoder segfaults on corrupt data; an ``.npy`` is
read with ``allow_pickle=False`` and fails with an exception. float16 keeps directions to ~0.06 deg
at 6 bytes per pixel (uncompressed: normals dominate shard size).

Decoding never crashes the process on corrupt data: PNG chunk CRCs are checked before any decoder
sees the bytes, and every decoder error, whatever its type (third-party decoders raise anything from
``ValueError`` to ``tokenize.TokenError``), becomes a :class:`SampleDecodeError` naming the shard, the
sample and the member. Decoders (:class:`Decoders`): libjpeg-turbo through ``simplejpeg`` (or PIL) for
the image, libspng through ``pyspng`` (or PIL) for the maps; ``simplejpeg`` can also decode at 1/2,
1/4 or 1/8 size when the image is going to be shrunk at least that much anyway. Where the fast library
is not installed (the bare GPU machine has neither), PIL decodes instead: the same pixels, only slower;
:meth:`Decoders.available` says which will run, and the loader logs the substitution once.
"""

from __future__ import annotations

import functools
import importlib
import io
import re
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from mtlora_dist.data.errors import SampleDecodeError
from mtlora_dist.tasks.registry import get_task

__all__ = [
    "ENCODING_VERSION",
    "Decoders",
    "installed",
    "jpeg_size",
    "read_npy",
    "IMAGE_SUFFIX",
    "JPEG_QUALITY",
    "Codec",
    "codec_for",
    "member_suffix",
    "encode_sample",
    "decode_sample",
    "check_png",
    "describe_encodings",
]

ENCODING_VERSION = 1
IMAGE_SUFFIX = "jpg"
JPEG_QUALITY = 95
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Decoders:
    """Which library decodes each member kind; the defaults are the fastest measured
    (``docs/performance-data.md``), ``"pil"`` is the baseline."""

    jpeg: str = "simplejpeg"  # simplejpeg | pil
    png: str = "pyspng"  # pyspng | pil

    def __post_init__(self) -> None:
        if self.jpeg not in ("simplejpeg", "pil") or self.png not in ("pyspng", "pil"):
            raise ValueError(f"unknown decoders {self}; jpeg: simplejpeg | pil, png: pyspng | pil")

    def available(self) -> Decoders:
        """These decoders with PIL in place of each library that cannot be imported here."""
        return Decoders(
            self.jpeg if self.jpeg == "pil" or installed(self.jpeg) else "pil",
            self.png if self.png == "pil" or installed(self.png) else "pil",
        )


@functools.cache
def installed(module: str) -> bool:
    """Whether ``module`` imports in this process (cached: decoding asks once per sample)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_png(data: bytes) -> tuple[int, int, int, int]:
    """Raise ``SampleDecodeError`` unless ``data`` is a structurally sound PNG with valid chunk CRCs;
    return its IHDR's ``(height, width, bit depth, colour type)``.

    torchvision's ``decode_png`` segfaults on some corrupt files, so nothing reaches a decoder
    unchecked. Cheap: one CRC32 pass over the bytes.
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise SampleDecodeError("not a PNG (bad signature)")
    pos, first, end, header = len(_PNG_SIGNATURE), True, False, (0, 0, 0, 0)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        body_end = pos + 8 + length
        if body_end + 4 > len(data):
            raise SampleDecodeError(f"PNG chunk {ctype!r} runs past the end of the data (truncated)")
        (crc,) = struct.unpack(">I", data[body_end : body_end + 4])
        if zlib.crc32(data[pos + 4 : body_end]) != crc:
            raise SampleDecodeError(f"PNG chunk {ctype!r} has a bad CRC (corrupt data)")
        if first:
            if ctype != b"IHDR" or length != 13:
                raise SampleDecodeError("PNG does not start with IHDR")
            width, height, depth, colour = struct.unpack(">IIBB", data[pos + 8 : pos + 18])
            header = (height, width, depth, colour)
        first = False
        pos = body_end + 4
        if ctype == b"IEND":
            end = True
            break
    if not end:
        raise SampleDecodeError("PNG has no IEND chunk (truncated)")
    return header


def _encode_png8(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"8-bit PNG maps must be uint8 HxW, got {array.dtype} {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _decode_png8(data: bytes, decoders: Decoders = Decoders()) -> np.ndarray:
    height, width, depth, colour = check_png(data)
    if (depth, colour) != (8, 0):
        raise SampleDecodeError(f"expected an 8-bit grayscale PNG, got bit depth {depth}, colour type {colour}")
    if decoders.png == "pyspng" and installed("pyspng"):
        import pyspng

        array = pyspng.load(data)
    else:
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im)  # forces the decode; PIL raises OSError on bad data
    if array.shape != (height, width) or array.dtype != np.uint8:
        raise SampleDecodeError(f"PNG decoded to {array.dtype} {array.shape}, its header says uint8 {(height, width)}")
    return array


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(
    r"^\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': (False|True), "
    r"'shape': \(((?:\d+, ?)*\d*)\), \}\s*$"
)


def read_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` array parsed strictly: the header by a regular expression, the data by ``frombuffer``.

    ``np.load`` parses the header with ``ast.literal_eval``: corrupt headers escape as tokenizer errors,
    and in forked DataLoader workers CPython 3.11's AST constructor can fail with "AST constructor
    recursion depth mismatch". Anything malformed here is a :class:`SampleDecodeError`."""
    if len(data) < 10 or data[:6] != _NPY_MAGIC or data[6] not in (1, 2, 3):
        raise SampleDecodeError("corrupt .npy: bad magic or version")
    size_bytes = 2 if data[6] == 1 else 4
    start = 8 + size_bytes
    header_len = int.from_bytes(data[8:start], "little")
    match = _NPY_HEADER.match(data[start : start + header_len].decode("latin1"))
    if match is None:
        raise SampleDecodeError("corrupt .npy: unreadable header")
    descr, fortran, shape_text = match.groups()
    try:
        dtype = np.dtype(descr)
    except TypeError as exc:
        raise SampleDecodeError(f"corrupt .npy: bad dtype {descr!r}") from exc
    shape = tuple(int(x) for x in shape_text.replace(" ", "").split(",") if x)
    body = memoryview(data)[start + header_len :]
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.hasobject or len(body) != count * dtype.itemsize:
        raise SampleDecodeError(f"corrupt .npy: {len(body)} data bytes for shape {shape} of {dtype}")
    return np.frombuffer(body, dtype=dtype, count=count).reshape(shape, order="F" if fortran == "True" else "C")


def _npy_codec(
    dtype: type, ndim: int, channels: int | None
) -> tuple[Callable[[np.ndarray], bytes], Callable[[bytes], np.ndarray]]:
    def encode(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
        return buf.getvalue()

    def decode(data: bytes, decoders: Decoders | None = None) -> np.ndarray:
        array = read_npy(data)
        if array.dtype != np.dtype(dtype) or array.ndim != ndim or (channels and array.shape[-1] != channels):
            raise SampleDecodeError(
                f"expected a {np.dtype(dtype)} array with {ndim} dims, got {array.dtype} {array.shape}"
            )
        return array  # float16 normals stay float16: the transforms convert once, where they need floats

    return encode, decode


@dataclass(frozen=True)
class Codec:
    """How one target kind is stored: file extension, encoder, decoder, a manifest description, and the
    canonical label of a sample that has none (a partial label: every pixel without supervision)."""

    ext: str
    encode: Callable[[np.ndarray], bytes]
    decode: Callable[..., np.ndarray]  # (data, decoders) -> array
    description: str
    missing: Callable[[int, int], np.ndarray]  # (h, w) -> the all-unsupervised label


# class ids and binary masks are stored alike: an 8-bit PNG, 255 (ignore) everywhere when unlabelled
_MAP_CODEC = Codec("png", _encode_png8, _decode_png8, "png:uint8", lambda h, w: np.full((h, w), 255, np.uint8))

_CODECS: dict[str, Codec] = {
    "class_map": _MAP_CODEC,
    "binary_map": _MAP_CODEC,
    "normals": Codec(
        "npy",
        *_npy_codec(np.float16, 3, 3),
        "npy:float16:HxWx3",  # decoded as float16
        lambda h, w: np.zeros((h, w, 3), np.float16),
    ),
    "depth": Codec(
        "npy", *_npy_codec(np.float32, 2, None), "npy:float32:HxW", lambda h, w: np.zeros((h, w), np.float32)
    ),
}


def codec_for(task: str) -> Codec:
    """The codec of ``task``, chosen by its target kind in the task registry."""
    return _CODECS[get_task(task).target_kind]


def member_suffix(task: str) -> str:
    """Tar member suffix of ``task`` (after ``<key>.``), e.g. ``semseg.png``."""
    return f"{task}.{codec_for(task).ext}"


def describe_encodings(tasks: Sequence[str]) -> dict[str, str]:
    return {"image": "jpg", **{t: codec_for(t).description for t in tasks}}


def _encode_image(image: np.ndarray, source_jpeg: bytes | None) -> bytes:
    if source_jpeg is not None:
        try:
            with Image.open(io.BytesIO(source_jpeg)) as im:
                if im.format == "JPEG" and im.mode == "RGB" and im.size == (image.shape[1], image.shape[0]):
                    return source_jpeg
        except OSError:
            pass
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_sample(
    sample: Mapping[str, Any], tasks: Sequence[str], source_jpeg: bytes | None = None, optional: Sequence[str] = ()
) -> list[tuple[str, bytes]]:
    """Tar members ``(suffix, bytes)`` of a canonical sample, in a fixed order (image, then ``tasks``).
    A task in ``optional`` that the sample lacks gets no member (a partial label); any other must be there."""
    members = [(IMAGE_SUFFIX, _encode_image(np.asarray(sample["image"]), source_jpeg))]
    for task in tasks:
        if task not in sample:
            if task in optional:
                continue
            raise ValueError(f"sample '{sample.get('__key__')}' has no '{task}' label, which is not optional")
        members.append((member_suffix(task), codec_for(task).encode(np.asarray(sample[task]))))
    return members


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG header without decoding, or None when it cannot be read."""
    if not installed("simplejpeg"):
        return None
    try:
        import simplejpeg

        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return int(height), int(width)
    except Exception:  # noqa: BLE001 - any failure: decode normally and let the decoder report it
        return None


def _decode_image(data: bytes, decoders: Decoders, min_hw: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 HxWx3; with ``min_hw``, possibly smaller (DCT scaling) but at least that large."""
    if decoders.jpeg == "simplejpeg" and data[:2] == b"\xff\xd8" and installed("simplejpeg"):
        import simplejpeg

        min_h, min_w = min_hw or (0, 0)
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=int(min_h), min_width=int(min_w))
    with Image.open(io.BytesIO(data)) as im:  # PIL: any format the converter may have stored
        return np.asarray(im.convert("RGB"))


def _decoded(what: str, decode: Callable[[], np.ndarray]) -> np.ndarray:
    """Run one decoder; whatever it raises becomes a ``SampleDecodeError`` saying ``what`` failed."""
    try:
        return decode()
    except SampleDecodeError as exc:
        raise SampleDecodeError(f"{what}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - third-party decoders raise anything; a bad sample must not end the run
        raise SampleDecodeError(f"{what}: corrupt data ({type(exc).__name__}: {exc})") from exc


def decode_sample(
    key: str,
    members: Mapping[str, bytes],
    tasks: Sequence[str],
    *,
    shard: str = "",
    decoders: Decoders = Decoders(),
    image_min_hw: tuple[int, int] | None = None,
    optional: Sequence[str] = (),
) -> dict[str, Any]:
    """The canonical sample from tar members. Any problem is a ``SampleDecodeError`` naming the shard,
    the sample and the member. ``image_min_hw``: the image may be decoded smaller, down to this size
    (labels always keep their full size; the transforms map between the two). A task in ``optional``
    (the manifest's ``optional_tasks``) without a member gets its all-unsupervised label and
    ``sample["labeled"][task] = False``."""
    where = f"shard {shard} sample '{key}'" if shard else f"sample '{key}'"
    labeled = {t: member_suffix(t) in members for t in tasks}
    wanted = [IMAGE_SUFFIX] + [member_suffix(t) for t in tasks if t not in optional]
    missing = [m for m in wanted if m not in members]
    if missing:
        raise SampleDecodeError(f"{where} lacks member(s) {missing}; it has {sorted(members)}")
    if not any(labeled.values()):  # no label gives the full size: the image must
        image_min_hw = None
    image = _decoded(
        f"{where} member '{IMAGE_SUFFIX}' (corrupt image)",
        lambda: _decode_image(members[IMAGE_SUFFIX], decoders, image_min_hw),
    )
    sample: dict[str, Any] = {"__key__": key, "image": image, "labeled": labeled}
    shape, first = None, ""
    for task in (t for t in tasks if labeled[t]):
        suffix = member_suffix(task)
        codec, data = codec_for(task), members[suffix]
        value = _decoded(f"{where} member '{suffix}'", lambda: codec.decode(data, decoders))  # noqa: B023 (called now)
        if shape is None:
            shape, first = value.shape[:2], task
        if value.shape[:2] != shape:
            raise SampleDecodeError(f"{where}: '{task}' is {value.shape[:2]} but '{first}' is {shape}")
        sample[task] = value
    full = shape if shape is not None else image.shape[:2]
    for task in (t for t in tasks if not labeled[t]):
        sample[task] = codec_for(task).missing(*full)
    reduced_ok = (
        image_min_hw is not None
        and full[0] // 8 <= image.shape[0] <= full[0]
        and full[1] // 8 <= image.shape[1] <= full[1]
    )
    if image.shape[:2] != full and not reduced_ok:
        raise SampleDecodeError(
            f"{where} member '{IMAGE_SUFFIX}': the image is {image.shape[:2]} but the labels are {full}"
        )
    sample["label_hw"] = tuple(int(x) for x in full)
    return sample
