"""Data, as two pipelines around one shard format:

* ``ingest``: sources to shards -- dataset readers, declared dataset formats, label helpers and the
  conversion (``launch/convert.py``);
* ``shards``: the shard format both pipelines share -- member encoding, tar primitives, the manifest
  and its per-sample index;
* ``stream``: shards to batches -- the epoch plan, the per-worker byte reader and sample stream,
  augmentation, collation and the loader the trainer iterates.

``errors`` is shared by all three. Synthetic datasets live outside the training path, in
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
