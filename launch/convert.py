"""Convert a dataset on disk into webdataset shards plus manifest.json (local folder or s3://).

    python launch/convert.py pascal_context --root DIR --split train --out s3://bucket/pascal/train \
        [--shard-size-mb 256] [--tasks semseg normals] [--workers 4]

Thin entry point: the work is in :mod:`mtlora_dist.data.convert`.
"""

from __future__ import annotations

import sys

from mtlora_dist.data.convert import main  # noqa: E402
from mtlora_dist.data.errors import DataError, StorageUnavailableError  # noqa: E402

import _cli  # noqa: F401  (puts the checkout on sys.path)

if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, DataError, StorageUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
