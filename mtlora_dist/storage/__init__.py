"""Reaching files and objects: local paths, ``file://`` and ``s3://`` through fsspec, with retries."""

from mtlora_dist.storage.fs import StorageOptions, describe_endpoint, is_remote, join, redact, url_to_fs
from mtlora_dist.storage.retry import StorageUnavailableError, is_transient, retry_call

__all__ = [
    "StorageOptions",
    "StorageUnavailableError",
    "describe_endpoint",
    "is_remote",
    "is_transient",
    "join",
    "redact",
    "retry_call",
    "url_to_fs",
]
