"""Let webdataset open ``s3://`` URLs through fsspec.

webdataset 1.0 has no ``s3`` handler of its own (only ``pipe:`` shell commands, which we avoid).
Importing this module registers one in ``webdataset.gopen_schemes``; the streaming code imports it,
so DataLoader workers started with spawn or forkserver have it too. Endpoint and credentials come
from the standard AWS variables (see :class:`~mtlora_dist.storage.fs.StorageOptions`).
"""

from __future__ import annotations

from typing import IO, Any

from mtlora_dist.storage.fs import StorageOptions, url_to_fs

__all__ = ["gopen_fsspec", "register"]


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """Open ``url`` for webdataset through fsspec, with a large block size for streaming reads."""
    options = StorageOptions()
    fs, path = url_to_fs(url, options)
    return fs.open(path, mode, block_size=options.block_size)


def register() -> None:
    """Register :func:`gopen_fsspec` for ``s3://`` (idempotent)."""
    try:
        import webdataset
    except ImportError:  # webdataset is only needed by users who read shards with it directly
        return
    webdataset.gopen_schemes["s3"] = gopen_fsspec


register()
