"""Data, as two pipelines:

* ``ingest``: sources to shards -- dataset readers, declared dataset formats, label helpers, the shard
  encoding and manifest, and the conversion (``launch/convert.py``);
* ``stream``: shards to batches -- the epoch plan, the per-worker shard stream, augmentation,
  collation and the loader the trainer iterates.

``errors`` is shared by both. Synthetic datasets live outside the training path, in
:mod:`mtlora_dist.synthetic`. The trainer needs :func:`build_loader` and :func:`normalize_image`; see
``docs/data.md``. The dataset format schema (:class:`DatasetFormat`) is imported eagerly (torch-free:
configs are checked before torch loads); the rest on first use (PEP 562).
"""

from mtlora_dist.data.ingest.format_spec import DatasetFormat, LabelFormat
from mtlora_dist.lazy import lazy_exports

__all__ = ["DatasetFormat", "LabelFormat", "ShardLoader", "build_loader", "collate", "normalize_image"]

__getattr__ = lazy_exports(
    __name__, **{"stream.batch": ["collate", "normalize_image"], "stream.loader": ["ShardLoader", "build_loader"]}
)
