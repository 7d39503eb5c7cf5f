"""Exceptions of the data path. Each takes one message string, so a DataLoader worker can re-raise it
in the main process unchanged; the message names the shard (and sample) and what to do."""

from __future__ import annotations

from mtlora_dist.storage.retry import StorageUnavailableError

__all__ = ["DataError", "SampleDecodeError", "ShardError", "StorageUnavailableError", "TooManyFailuresError"]


class DataError(RuntimeError):
    """A problem with the data itself (bad shard, bad sample, wrong manifest) when skipping is off."""


class SampleDecodeError(ValueError):
    """One sample cannot be used: a member is missing, corrupt or has the wrong shape."""


class ShardError(DataError):
    """A shard is unreadable, truncated or disagrees with the manifest."""


class TooManyFailuresError(DataError):
    """Skipping was on, but so much failed that going on would train on little real data."""
