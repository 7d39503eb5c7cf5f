"""Data: dataset readers, declared dataset formats, synthetic data, shard conversion, and streaming
into batches.

The trainer needs :func:`build_loader` and :func:`normalize_image`; see ``docs/data.md``. The dataset
format schema (:class:`DatasetFormat`) is imported eagerly (torch-free: configs are checked before torch
loads); the rest on first use (PEP 562).
"""

from mtlora_dist.data.format_spec import DatasetFormat, LabelFormat
from mtlora_dist.lazy import lazy_exports

__all__ = ["DatasetFormat", "LabelFormat", "ShardLoader", "build_loader", "collate", "normalize_image"]

__getattr__ = lazy_exports(__name__, batch=["collate", "normalize_image"], loader=["ShardLoader", "build_loader"])
