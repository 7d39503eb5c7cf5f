"""Writing and reading webdataset tar shards, byte for byte reproducibly.

A shard is a plain USTAR tar whose consecutive members ``<key>.<suffix>`` form one sample (the
webdataset convention: the key is the member name up to the first dot of its base name). Headers are
fixed (mtime 0, uid/gid 0, no user names, mode 0444) so the same samples give the same bytes.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Sequence
from typing import IO

__all__ = ["TarShardWriter", "iter_tar_samples", "split_member_name"]


class TarShardWriter:
    """Appends samples to a local tar file with deterministic headers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.num_samples = 0

    @property
    def size(self) -> int:
        """Bytes written so far (before the end-of-archive blocks)."""
        return self._file.tell()

    def add(self, key: str, members: Sequence[tuple[str, bytes]]) -> None:
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            self._tar.addfile(info, io.BytesIO(data))
        self.num_samples += 1

    def close(self) -> None:
        self._tar.close()
        self._file.close()

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/2008_000002.semseg.png"`` -> ``("dir/2008_000002", "semseg.png")``."""
    head, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), suffix


def iter_tar_samples(fileobj: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {suffix: bytes})`` per sample from a tar stream, in archive order.

    Reads sequentially (``r|``), so it works on non-seekable streams. Non-file members and names
    starting with ``__`` are ignored. ``tarfile.ReadError`` propagates for a corrupt header; note that a
    stream cut at a header boundary just ends, which is why callers compare counts with the manifest.
    """
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        key: str | None = None
        members: dict[str, bytes] = {}
        for info in tar:
            if not info.isreg():
                continue
            k, suffix = split_member_name(info.name)
            if k.rpartition("/")[2].startswith("__"):
                continue
            extracted = tar.extractfile(info)
            data = extracted.read() if extracted is not None else b""
            if len(data) != info.size:
                raise tarfile.ReadError(f"member {info.name} is truncated ({len(data)} of {info.size} bytes)")
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            members[suffix] = data
        if key is not None:
            yield key, members
