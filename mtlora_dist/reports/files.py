"""Writing report files to a run directory that may be local or on S3."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile

from PIL import Image

from mtlora_dist.storage.atomic import atomic_write
from mtlora_dist.storage.fs import StorageOptions, is_remote, url_to_fs

__all__ = ["save_png"]


def save_png(image: Image.Image, url: str, storage: StorageOptions | None = None) -> str:
    """Write ``image`` as a PNG to ``url`` (atomically: temporary name then rename, or one PUT on S3) and
    return a local path holding the same file (what wandb wants)."""
    if not is_remote(url):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write(url, buffer.getvalue())
        return url_to_fs(url)[1]
    folder = os.path.join(tempfile.gettempdir(), "mtlora-reports", hashlib.sha256(url.encode()).hexdigest()[:12])
    os.makedirs(folder, exist_ok=True)
    local = os.path.join(folder, url.rsplit("/", 1)[-1])
    image.save(local, format="PNG")
    fs, path = url_to_fs(url, storage)
    fs.put_file(local, path)
    return local
