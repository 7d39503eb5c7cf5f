"""One way to reach files: local paths, ``file://`` and ``s3://`` URLs through fsspec.

Remote locations stay plain strings everywhere in the package: a ``pathlib.Path`` collapses the
``//`` of ``s3://`` and silently turns a bucket into a local folder.
"""

from __future__ import annotations

import os
import re
import weakref
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
    "is_secret_key",
]

# ``key`` alone is StorageOptions' access key id: a credential too.
_SECRET_KEYS = re.compile(r"(^key$|secret|password|token|key_id|access_key|credential)", re.IGNORECASE)


@dataclass
class StorageOptions:
    """Object-storage settings; anything left ``None`` falls back to the standard AWS variables.

    Credentials are read from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` when not given here, and
    are never written into saved configs or logs (see :func:`redact`).

    Two retry layers: ``retries`` is botocore's own number of retries per request (after the first
    attempt); ``read_retries`` is how often a whole read is started again (a shard resumes where it
    broke) after that gave up, waiting ``retry_delay_s`` doubled per attempt (capped at 30 s).
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


_INHERITED: list[Any] = []  # in a forked child: the parent's S3 clients, kept alive and never closed here


def _forget_inherited_s3_sessions() -> None:
    """In a forked child (a DataLoader worker), leave the parent's S3 clients alone.

    s3fs closes a client from a ``weakref.finalize`` bound to the parent's event loop. Collected in
    the child, that finalizer blocks on a loop that does not run there, or awaits the parent's futures
    on the child's loop ("attached to a different loop" errors); without it, aiohttp warns about an
    unclosed connector. The child never uses the parent's clients (:func:`cached_fs` keys them by
    process id), so it keeps them referenced and disarms their finalizers; the parent closes its own.
    """
    for finalizer in list(getattr(weakref.finalize, "_registry", {})):  # CPython keeps every finalizer here
        info = finalizer.peek()  # (object, func, args, kwargs) while alive
        if info is not None and getattr(info[1], "__qualname__", "").endswith("S3FileSystem.close_session"):
            _INHERITED.append(info[0])
            finalizer.detach()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_s3_sessions)


def describe_endpoint(options: StorageOptions | None = None) -> str:
    """Where S3 requests go, for error messages: the endpoint and where it came from (no secrets)."""
    options = options or StorageOptions()
    if options.endpoint_url:
        return f"endpoint {options.endpoint_url} (StorageOptions.endpoint_url)"
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return f"endpoint {os.environ[var]} (${var})"
    return "AWS's default endpoint (no endpoint_url / $AWS_ENDPOINT_URL set)"


def is_secret_key(name: str) -> bool:
    """True for a mapping key whose value is a credential (``key``, ``secret``, ``*token*``, ...)."""
    return bool(_SECRET_KEYS.search(name))


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
