"""The counters every loader reports (the same keys on every rank, so they can be summed across ranks)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["STAT_KEYS", "labels_missing_key", "stat_keys"]

STAT_KEYS = (
    "samples_read",  # raw samples read from shards
    "samples_yielded",  # samples placed in batches (padding copies included)
    "samples_skipped",  # read but unusable: corrupt member, missing task member
    "samples_missing",  # listed in the manifest but never read: failed or truncated shards
    "samples_padded",  # copies placed in batches (evaluation padding, stand-ins for failures)
    "samples_resume_skipped",  # consumed before a resume, skipped undecoded
    "shards_opened",  # shards opened on their storage (cache hits not included)
    "bytes_read",  # bytes read from the shards' storage (cache hits not included)
    "shards_from_cache",  # shards read from the local shard cache
    "shards_failed",
    "retries",
    "read_requests",  # ranged requests sent to storage (retries included; indexed manifests)
    "read_held_peak",  # the most bytes a worker held ahead of delivery, summed over the rank's workers
)


def labels_missing_key(task: str) -> str:
    """The stats counter of samples that had no ``task`` label (partial labels)."""
    return f"labels_missing/{task}"


def stat_keys(tasks: Sequence[str]) -> tuple[str, ...]:
    """Every counter a loader over ``tasks`` reports (the same on every rank, so they can be summed)."""
    return STAT_KEYS + tuple(labels_missing_key(t) for t in tasks)
