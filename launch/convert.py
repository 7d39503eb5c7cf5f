"""Convert a dataset on disk into webdataset shards plus manifest.json (local folder or s3://).

    python launch/convert.py pascal_context --root DIR --split train --out s3://bucket/pascal/train \
        [--shard-size-mb 256] [--tasks semseg normals] [--workers 4] [--part I --num-parts N] [--restart]
    python launch/convert.py my_dataset --root DIR --split train --out DIR   # configs/data/my_dataset.yaml
    python launch/convert.py --merge --out s3://bucket/pascal/train          # merge finished parts
    python launch/convert.py --index --out s3://bucket/pascal/train          # index an older conversion

DATASET is a built-in dataset, or a data config with a ``format:`` section (a name in configs/data/ or
a YAML path). Re-running a killed command resumes it; under a SLURM array each task converts its part
(docs/data.md, 'Conversion at scale'). Thin entry point: the work is in :mod:`mtlora_dist.data.ingest.convert`.
"""

from __future__ import annotations

import sys

from mtlora_dist.data.errors import DataError, StorageUnavailableError
from mtlora_dist.data.ingest.convert import main
from mtlora_dist.data.ingest.format_spec import DatasetFormat
from mtlora_dist.data.ingest.formats import READERS

import _cli  # noqa: F401  (puts the checkout on sys.path)


def resolve_dataset(name: str) -> tuple[str, DatasetFormat | None]:
    """``(dataset, format)`` of a data config (name in configs/data/ or YAML path) for the converter."""
    from mtlora_dist.config import ConfigError, data_config

    cfg = data_config(name)
    if cfg.format is None and cfg.dataset not in READERS:
        raise ConfigError(
            f"data config '{name}' (dataset '{cfg.dataset}') has no 'format:' section: declare where the images "
            f"and labels are (docs/data.md), or convert a built-in dataset {sorted(READERS)}"
        )
    return cfg.dataset, cfg.format


def check_output_bucket(argv: list[str]) -> None:
    """``--out s3://bucket/...``: the bucket exists and takes our credentials, before any shard is written."""
    from mtlora_dist.storage.buckets import require_buckets

    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            require_buckets({"--out": argv[i + 1]})
        elif arg.startswith("--out="):
            require_buckets({"--out": arg[len("--out=") :]})


if __name__ == "__main__":
    from mtlora_dist.storage.buckets import StorageAccessError

    try:
        check_output_bucket(sys.argv[1:])
        main(resolve=resolve_dataset)
    except (
        FileNotFoundError,
        PermissionError,
        ValueError,
        DataError,
        StorageUnavailableError,
        StorageAccessError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume after the last finished shard", file=sys.stderr)
        sys.exit(130)
