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
    "describe_endpoint",
    "redact",
    "is_secret_key",
    "has_userinfo",
    "redact_userinfo",
]

# ``scheme://user:password@host/...``: credentials inside a URL (user-info), masked in every message. A URL
# runs to the next space or quote; where its user-info ends is decided by :func:`_userinfo_end`.
_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*)://([^\s'\"<>]*)")
# Schemes whose authority never has a port: ``s3://KEY:...`` can only be user-info (a bucket has no ':').
_PORTLESS = frozenset({"s3", "s3a", "s3n", "gs", "gcs", "az", "abfs", "abfss", "adl", "file", "hf"})

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
        """Keyword arguments for ``s3fs.S3FileSystem``. Endpoint and credentials are resolved here (these
        settings first, then ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
        ``AWS_SECRET_ACCESS_KEY``), so fsspec's instance cache, keyed by these arguments, hands back a
        filesystem made with the current settings. Listings are never cached: a checkpoint folder or a
        shard prefix is listed to see what another process has just written."""
        env = os.environ
        endpoint = self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {
            "default_block_size": self.block_size,
            "use_listings_cache": False,
            "config_kwargs": {"retries": {"max_attempts": self.retries, "mode": "standard"}},
        }
        if self.anon:
            kwargs["anon"] = True
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        key, secret = self.key or env.get("AWS_ACCESS_KEY_ID"), self.secret or env.get("AWS_SECRET_ACCESS_KEY")
        if key:
            kwargs["key"] = key
        if secret:
            kwargs["secret"] = secret
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
    """Return the filesystem for ``url`` and the path within it (no scheme).

    Filesystems come from fsspec's instance cache: one per process, thread and settings, so streaming
    many shards reuses one connection pool, and a forked DataLoader worker makes its own (fsspec clears
    the cache in a new process: an aiohttp session must not cross a fork)."""
    url = str(url)
    options = options or StorageOptions()
    if url.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(**options.s3_kwargs())
        return fs, url[len("s3://") :]
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


_INHERITED: list[Any] = []  # in a forked child: the parent's S3 clients, kept alive and never closed here


def _forget_inherited_s3_sessions() -> None:
    """In a forked child (a DataLoader worker), leave the parent's S3 clients alone.

    s3fs closes a client from a ``weakref.finalize`` bound to the parent's event loop. Collected in
    the child, that finalizer blocks on a loop that does not run there, or awaits the parent's futures
    on the child's loop ("attached to a different loop" errors); without it, aiohttp warns about an
    unclosed connector. The child never uses the parent's clients (fsspec's instance cache is per
    process), so it keeps them referenced and disarms their finalizers; the parent closes its own.
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


def _userinfo_end(scheme: str, rest: str) -> int:
    """Where the user-info of ``scheme://rest`` ends (the index of its ``@`` in ``rest``), or -1 for none.

    RFC 3986 keeps ``/`` out of user-info, but real AWS secrets contain it (``s3://AKID:ab/cd@bucket/x``):
    read as a URL, that is the bucket ``AKID:ab``, and s3fs prints it. So a ``:`` before the first ``/``
    that is not a port (``host:9000``; object-store URLs have none) starts user-info, which runs to the
    last ``@`` of the URL (a path's own ``@`` is masked too: more is hidden, never less). Without such a
    ``:``, user-info is what comes before the last ``@`` of the authority (``s3://KEY@bucket``)."""
    authority = rest.split("/", 1)[0]
    port = scheme.lower() not in _PORTLESS and re.fullmatch(r"[^:@]*:\d*", authority)
    if ":" in authority and not port:
        return rest.rfind("@")
    return authority.rfind("@")


def has_userinfo(text: str) -> bool:
    """True if ``text`` holds a URL with user-info (``s3://KEY:SECRET@bucket/...``, a secret with ``/`` too)."""
    return any(_userinfo_end(m.group(1), m.group(2)) > 0 for m in _URL.finditer(str(text)))


def redact_userinfo(text: str) -> str:
    """``text`` with the user-info of every URL in it replaced by ``***`` (``s3://***@bucket/x``)."""

    def mask(match: re.Match) -> str:
        scheme, rest = match.group(1), match.group(2)
        end = _userinfo_end(scheme, rest)
        return match.group(0) if end < 0 else f"{scheme}://***{rest[end:]}"

    return _URL.sub(mask, str(text))


def redact(value: Any) -> Any:
    """Copy of a (nested) mapping with every credential-like value replaced by ``'***'``, and the user-info
    of any URL in a string masked (``s3://***@bucket``)."""
    if isinstance(value, str):
        return redact_userinfo(value)
    if isinstance(value, dict):
        return {
            k: ("***" if isinstance(k, str) and _SECRET_KEYS.search(k) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
