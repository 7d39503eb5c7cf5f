"""Retrying reads from object storage, and telling a dead endpoint apart from bad data.

A network failure is worth retrying; a corrupt file is not, and a missing object or a refused
credential will not heal by waiting. :func:`is_transient` draws that line. Errors from botocore and
aiohttp are not ``OSError`` subclasses (an ``EndpointConnectionError`` is a ``BotoCoreError``), so the
check looks at where an exception class comes from, not only at its type.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from mtlora_dist.storage.fs import StorageOptions, describe_endpoint, is_remote

__all__ = [
    "StorageUnavailableError",
    "is_transient",
    "backoff_delays",
    "RetryBudget",
    "retry_call",
    "unreachable_message",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_NETWORK_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "s3fs", "http.client", "ssl")
_PERMANENT_NAMES = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "NoSuchBucket",
    "NoSuchKey",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ParamValidationError",
}


class StorageUnavailableError(RuntimeError):
    """A read kept failing after every retry: the endpoint is down, unreachable or refusing us."""


def is_transient(exc: BaseException) -> bool:
    """True for failures that may go away by waiting (connection refused or reset, timeouts, 5xx)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if type(exc).__name__ in _PERMANENT_NAMES:
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    module = type(exc).__module__ or ""
    if module.startswith(_NETWORK_MODULES):
        return True
    # s3fs maps most HTTP errors to a bare OSError; local disks raise OSError for I/O errors too.
    return type(exc) is OSError


def backoff_delays(attempts: int, base_s: float, cap_s: float = 30.0) -> list[float]:
    """Waits before retry 1..attempts: ``base, 2*base, 4*base, ...`` capped at ``cap_s``."""
    return [min(cap_s, base_s * (2**i)) for i in range(max(0, attempts))]


def unreachable_message(url: str, exc: BaseException, attempts: int, options: StorageOptions | None) -> str:
    """One message that names the URL, the last error and what to check."""
    where = f" at {describe_endpoint(options)}" if is_remote(url) else ""
    hint = (
        "check that the S3 server is running and reachable, the endpoint URL, the credentials "
        "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or StorageOptions) and that the bucket exists"
        if is_remote(url)
        else "check that the path exists and the disk is readable"
    )
    return f"could not read {url}{where} after {attempts} attempt(s): {type(exc).__name__}: {exc}; {hint}"


class RetryBudget:
    """The retries of one read: which failures are retried, how long to wait, the log line. Shared by
    :func:`retry_call` and the shard stream (which also resets the budget when a retry got further)."""

    def __init__(self, url: str, options: StorageOptions | None = None) -> None:
        self.url, self.options = url, options or StorageOptions()
        self.delays = backoff_delays(self.options.read_retries, self.options.retry_delay_s)
        self.attempt = 0  # retries used

    def next_delay(self, exc: BaseException) -> float | None:
        """Seconds to wait before retrying after ``exc`` (logged), or ``None``: ``exc`` is permanent or
        the retries are spent."""
        if not is_transient(exc) or self.attempt >= len(self.delays):
            return None
        delay = self.delays[self.attempt]
        self.attempt += 1
        log.warning(
            "reading %s failed (%s: %s); retry %d/%d in %.1f s",
            self.url,
            type(exc).__name__,
            exc,
            self.attempt,
            len(self.delays),
            delay,
        )
        return delay

    def reset(self) -> None:
        self.attempt = 0

    def unavailable(self, exc: BaseException) -> StorageUnavailableError:
        """The error to raise once the retries are spent: names the URL, the endpoint and what to check."""
        return StorageUnavailableError(unreachable_message(self.url, exc, self.attempt + 1, self.options))


def retry_call(
    fn: Callable[[], T],
    *,
    url: str,
    options: StorageOptions | None = None,
    on_retry: Callable[[int, BaseException], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient failures with exponential backoff.

    Permanent failures propagate unchanged at once. When the retries run out the last error is
    wrapped in :class:`StorageUnavailableError` whose message names ``url`` and what to check.
    """
    budget = RetryBudget(url, options)
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised if not transient
            delay = budget.next_delay(exc)
            if delay is None:
                if is_transient(exc):
                    raise budget.unavailable(exc) from exc
                raise
            if on_retry is not None:
                on_retry(budget.attempt, exc)
            sleep(delay)
