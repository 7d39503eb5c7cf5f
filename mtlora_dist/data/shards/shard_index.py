"""The per-sample byte index of a shard: where each sample's tar records start, and a digest of them.

The converter stores it in the manifest (``ShardInfo.offsets``/``digests``). With it a worker that
needs only some samples of a shard reads just their bytes (ranged reads on S3) and still checks every
byte it uses, so the bytes read per epoch stay at the size of the samples used however many workers
share a shard (``docs/data.md``, "Bounds"). Without it (manifests written before it existed) each
worker reads and hashes whole shards; ``launch/convert.py --index --out URL`` adds it in place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import tempfile
from dataclasses import replace

from webdataset.tariterators import base_plus_ext

from mtlora_dist.data.errors import ShardError
from mtlora_dist.data.shards.manifest import DIGEST_HEX, Manifest, ShardInfo, read_manifest
from mtlora_dist.storage.atomic import atomic_write
from mtlora_dist.storage.fs import StorageOptions, join, url_to_fs
from mtlora_dist.storage.retry import retry_call

__all__ = ["sample_digest", "sample_offsets", "shard_info", "index_manifest"]

log = logging.getLogger(__name__)

_BLOCK = 512


def sample_digest(data: bytes) -> str:
    """The digest the index keeps of one sample's bytes."""
    return hashlib.sha256(data).hexdigest()[:DIGEST_HEX]


def sample_offsets(path: str) -> list[int]:
    """Byte offset of each sample's first member header, then the end of the last sample's data.

    Samples are grouped as webdataset groups them (consecutive members sharing ``base_plus_ext``'s key),
    so sample ``i`` here is sample ``i`` of ``iter_tar_samples``. Reads the headers only.
    """
    offsets: list[int] = []
    key, end = None, 0
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            prefix, _ = base_plus_ext(member.name)
            if prefix is None or not member.isfile():
                raise ShardError(f"{path}: member {member.name!r} is not '<key>.<suffix>': not a shard of ours")
            if prefix != key:
                offsets.append(member.offset)
                key = prefix
            end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
    return offsets + [end]


def shard_info(path: str, name: str) -> ShardInfo:
    """Everything the manifest records of the local shard ``path``: count, size, sha256 and the index
    (one pass over the bytes after a pass over the headers)."""
    offsets = sample_offsets(path)
    whole, digests = hashlib.sha256(), []
    with open(path, "rb") as f:
        for start, stop in zip(offsets, offsets[1:]):
            data = f.read(stop - start)
            whole.update(data)
            digests.append(sample_digest(data))
        while rest := f.read(8 << 20):  # the end-of-archive blocks
            whole.update(rest)
    return ShardInfo(
        name, len(offsets) - 1, os.path.getsize(path), whole.hexdigest(), offsets=offsets, digests="".join(digests)
    )


def index_manifest(url: str, storage: StorageOptions | None = None) -> Manifest:
    """Add the per-sample index to the manifest of the shard folder ``url``, in place.

    Each shard without one is copied to a temporary file once, checked against the manifest's size and
    sha256 (a shard that differs is an error naming it: nothing is indexed from changed bytes), and
    indexed; the manifest is rewritten last, in one write.
    """
    manifest = read_manifest(url, storage)
    shards = []
    for i, shard in enumerate(manifest.shards):
        shards.append(shard if shard.indexed else _index_one(manifest.shard_url(i), shard, storage))
    indexed = replace(manifest, shards=shards)
    if shards != manifest.shards:
        target = join(manifest.base_url, "manifest.json")
        retry_call(lambda: atomic_write(target, indexed.to_json().encode(), storage), url=target, options=storage)
        log.info("indexed %d shard(s) of %s", sum(not s.indexed for s in manifest.shards), target)
    return indexed


def _index_one(url: str, shard: ShardInfo, storage: StorageOptions | None) -> ShardInfo:
    fs, path = url_to_fs(url, storage)
    with tempfile.TemporaryDirectory(prefix="mtlora-index-") as tmp:
        local = os.path.join(tmp, shard.name)
        retry_call(lambda: fs.get_file(path, local), url=url, options=storage)
        info = shard_info(local, shard.name)
    if (info.bytes, info.sha256, info.num_samples) != (shard.bytes, shard.sha256, shard.num_samples):
        raise ShardError(
            f"shard {url} does not match its manifest ({info.bytes} bytes, {info.num_samples} samples, sha256 "
            f"{info.sha256[:16]}...; the manifest says {shard.bytes}, {shard.num_samples}, {shard.sha256[:16]}...): "
            "restore the shard or re-run the conversion; nothing was indexed"
        )
    return info
