"""One way to reach files: local paths, ``file://`` and ``s3://`` URLs through fsspec.

Remote locations stay plain strings everywhere in the package: a ``pathlib.Path`` collapses the
``//`` of ``s3://`` and silently turns a bucket into a local folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import fsspec

__all__ = [
    "StorageOptions",
    "is_remote",
    "join",
    "url_to_fs",
    "redact",
]

_SECRET_KEYS = re.compile(r"(secret|password|token|key_id|access_key|credential)", re.IGNORECASE)


@dataclass
class StorageOptions:
    """Object-storage settings; anything left ``None`` falls back to the standard AWS variables.

    Credentials are read from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` when not given here, and
    are never written into saved configs or logs (see :func:`redact`).
    """

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    region: str | None = None
    anon: bool = False
    block_size: int = 16 * 1024 * 1024
    retries: int = 5

    def s3_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem``; ``skip_instance_cache`` so a changed endpoint or
        key takes effect (s3fs otherwise hands back a cached client made with the old settings)."""
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {
            "skip_instance_cache": True,
            "default_block_size": self.block_size,
            "config_kwargs": {"retries": {"max_attempts": self.retries, "mode": "standard"}},
        }
        if self.anon:
            kwargs["anon"] = True
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if self.key:
            kwargs["key"] = self.key
        if self.secret:
            kwargs["secret"] = self.secret
        if self.region:
            kwargs["client_kwargs"] = {"region_name": self.region}
        return kwargs


def is_remote(url: str) -> bool:
    """True for URLs with a scheme other than ``file``."""
    scheme = str(url).split("://", 1)[0] if "://" in str(url) else ""
    return scheme not in ("", "file")


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` keeping the scheme intact (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    out = str(base).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def url_to_fs(url: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem for ``url`` and the path within it (no scheme)."""
    url = str(url)
    options = options or StorageOptions()
    if url.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(**options.s3_kwargs())
        return fs, url[len("s3://"):]
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def redact(value: Any) -> Any:
    """Copy of a (nested) mapping with every credential-like value replaced by ``'***'``."""
    if isinstance(value, dict):
        return {
            k: ("***" if isinstance(k, str) and _SECRET_KEYS.search(k) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
