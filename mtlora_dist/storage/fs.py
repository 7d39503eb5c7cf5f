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
    "cached_fs",
    "describe_endpoint",
    "redact",
]

_SECRET_KEYS = re.compile(r"(secret|password|token|key_id|access_key|credential)", re.IGNORECASE)


@dataclass
class StorageOptions:
    """Object-storage settings; anything left ``None`` falls back to the standard AWS variables.

    Credentials are read from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` when not given here, and
    are never written into saved configs or logs (see :func:`redact`).

    Two retry layers: ``retries`` is botocore's own attempt count per request; ``read_retries`` is how
    often a whole shard read is re-opened (resuming where it broke) after that gave up, waiting
    ``retry_delay_s`` doubled per attempt (capped at 30 s) in between.
    """

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    region: str | None = None
    anon: bool = False
    block_size: int = 16 * 1024 * 1024
    retries: int = 5
    read_retries: int = 4
    retry_delay_s: float = 1.0

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


_FS_CACHE: dict[tuple[int, str, str], fsspec.AbstractFileSystem] = {}  # (pid, protocol, settings)


def cached_fs(url: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Like :func:`url_to_fs` but one filesystem per process, protocol and options.

    Streaming opens many shards; a new ``S3FileSystem`` per shard would pay a fresh connection pool
    each time. The process id is part of the key because an aiohttp session must not cross a fork
    (DataLoader workers build their own).
    """
    url = str(url)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = options or StorageOptions()
    # The resolved endpoint and key id are part of the key: they may come from the environment.
    resolved = repr(options.s3_kwargs()) + os.environ.get("AWS_ACCESS_KEY_ID", "") if protocol == "s3" else ""
    key = (os.getpid(), protocol, repr(options) + resolved)
    fs = _FS_CACHE.get(key)
    if fs is None:
        fs, _ = url_to_fs(url, options)
        _FS_CACHE[key] = fs
    return fs, fs._strip_protocol(url)


def describe_endpoint(options: StorageOptions | None = None) -> str:
    """Where S3 requests go, for error messages: the endpoint and where it came from (no secrets)."""
    options = options or StorageOptions()
    if options.endpoint_url:
        return f"endpoint {options.endpoint_url} (StorageOptions.endpoint_url)"
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return f"endpoint {os.environ[var]} (${var})"
    return "AWS's default endpoint (no endpoint_url / $AWS_ENDPOINT_URL set)"


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
