"""A node-local cache of remote shards: later epochs read local disk instead of the object store.

Entries are named by their content (``<sha256>.tar``), so the cache needs no index and every process
of a node (all DataLoader workers of all ranks) can share one folder without locks:

* a shard is written to a private temporary file while it streams in, and renamed into place only
  after the whole object arrived and its sha256 matched the manifest (the rename is atomic: a reader
  sees a complete entry or none; two processes storing the same shard write identical bytes);
* a hit refreshes the entry's modification time; after each store the oldest entries are deleted
  until the folder is under its size cap (a reader that still has one open keeps reading it: POSIX);
* an entry that fails verification when read is deleted, and the shard is read from the store again;
* temporary files of a process that died while storing are deleted after an hour.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from typing import IO

__all__ = ["ShardCache"]

log = logging.getLogger(__name__)
_ENTRY = re.compile(r"^[0-9a-f]{64}\.tar$")
STALE_PART_S = 3600.0  # a temporary file not written to for an hour belongs to a dead process


class ShardCache:
    """Content-addressed shard files in ``folder``, at most ``max_bytes`` in all (oldest evicted first)."""

    def __init__(self, folder: str, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the shard cache needs a positive size cap, got {max_bytes} bytes")
        self.folder = os.path.abspath(os.path.expanduser(folder))
        self.max_bytes = int(max_bytes)
        os.makedirs(self.folder, exist_ok=True)

    def path(self, sha256: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return os.path.join(self.folder, f"{sha256}.tar")

    def open(self, sha256: str) -> IO[bytes] | None:
        """The cached shard opened for reading, or None when it is not cached."""
        path = self.path(sha256)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass  # evicted between open and utime: the open file still reads
        return f

    def discard(self, sha256: str) -> None:
        """Delete an entry that turned out to be corrupt."""
        try:
            os.remove(self.path(sha256))
        except FileNotFoundError:
            pass

    def new_entry(self, sha256: str) -> CacheEntryWriter:
        return CacheEntryWriter(self, sha256)

    def entries(self) -> list[tuple[float, int, str]]:
        """``(mtime, size, path)`` of every complete entry, oldest first. Temporary files older than
        ``STALE_PART_S`` (left by a process that died while storing) are deleted on the way."""
        found = []
        now = time.time()
        with os.scandir(self.folder) as it:
            for entry in it:
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # evicted by another process meanwhile
                if _ENTRY.match(entry.name):
                    found.append((st.st_mtime, st.st_size, entry.path))
                elif entry.name.endswith(".part") and now - st.st_mtime > STALE_PART_S:
                    try:
                        os.remove(entry.path)
                    except FileNotFoundError:
                        pass
        return sorted(found)

    def evict(self, keep: str | None = None) -> int:
        """Delete the oldest entries (never ``keep``) until the cache fits its cap; returns bytes freed."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        freed = 0
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            total -= size
            freed += size
        return freed


class CacheEntryWriter:
    """A shard on its way into the cache: bytes go to a temporary file, :meth:`commit` publishes it."""

    def __init__(self, cache: ShardCache, sha256: str) -> None:
        self.cache, self.sha256 = cache, sha256
        fd, self.tmp = tempfile.mkstemp(prefix=f".{sha256[:16]}-", suffix=".part", dir=cache.folder)
        self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self) -> None:
        """Publish the entry (the caller verified size and sha256) and evict older ones over the cap."""
        self._file.close()
        final = self.cache.path(self.sha256)
        os.replace(self.tmp, final)
        self.cache.evict(keep=final)

    def abort(self) -> None:
        self._file.close()
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass
