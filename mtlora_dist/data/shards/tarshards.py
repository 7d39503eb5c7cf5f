"""Shards in webdataset's format, written and read with webdataset's own tar primitives.

A shard is a plain USTAR tar whose consecutive members ``<key>.<suffix>`` form one sample (the
webdataset convention: the key is the member name up to the first dot of its base name), so any
``webdataset.WebDataset`` reads our shards. What this module adds around webdataset's ``TarWriter``,
``tar_file_iterator`` and ``group_by_keys``: fixed headers (mtime 0, uid/gid 0, no user names, mode
0444) so the same samples give the same bytes, the size a shard will have (the converter cuts shards
by size), and ``(key, members)`` pairs with errors the streaming code can classify.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import IO

from webdataset.tariterators import group_by_keys, tar_file_iterator
from webdataset.writer import TarWriter

from mtlora_dist.data.errors import ShardError

__all__ = ["TarShardWriter", "iter_tar_samples", "tar_size"]

_BLOCK = 512


def tar_size(members: Mapping[str, bytes]) -> int:
    """Bytes that ``members`` take in a tar: a header block each plus the data padded to blocks."""
    return sum(_BLOCK + -(-len(data) // _BLOCK) * _BLOCK for data in members.values())


class TarShardWriter:
    """Writes samples ``{suffix: bytes}`` into a local tar, reproducibly, through webdataset's ``TarWriter``.

    Members of a sample are stored in sorted suffix order (``TarWriter``'s order)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "wb")
        self._writer = TarWriter(self._file, user="", group="", mode=0o444, mtime=0, encoder=False)  # USTAR
        self.num_samples = 0
        self.size = 0  # bytes of the samples so far (before the end-of-archive blocks)

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        members = dict(members)
        self._writer.write({"__key__": key, **members})
        self.size += tar_size(members)
        self.num_samples += 1

    def close(self) -> None:
        self._writer.close()
        self._file.close()

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _named(members: Iterator[dict], url: str) -> Iterator[dict]:
    for member in members:
        member["__url__"] = url
        yield member


def iter_tar_samples(fileobj: IO[bytes], url: str = "") -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {suffix: bytes})`` per sample of a tar stream, in archive order (sequential reads).

    A corrupt header or a member cut short raises ``tarfile.TarError``; a member name repeated within a
    sample raises :class:`ShardError`. A stream cut at a header boundary just ends, which is why the
    streaming code compares counts and checksums with the manifest.
    """
    try:
        for sample in group_by_keys(_named(tar_file_iterator(fileobj), url)):
            key = sample.pop("__key__")
            sample.pop("__url__", None)
            yield key, sample
    except ValueError as exc:  # group_by_keys: a duplicate member name
        raise ShardError(f"shard {url or fileobj}: {exc.args[0] if exc.args else exc}") from None
