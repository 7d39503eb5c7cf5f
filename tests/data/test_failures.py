"""Damaged data is counted and replaced (``on_error="skip"``) or a clear error (``"raise"``), never silent.

Every case runs through a real DataLoader worker: a crash in a decoder would surface as a dead worker.
With the manifest's per-sample index (what conversion writes) every sample is read and checked on its
own, so damage costs the damaged samples only. Without the index (``drop_index``: a manifest from
before it existed) a verified shard fails as a whole; unverified, the samples before the damage are
still used.
"""

from __future__ import annotations

import json
import os
import tarfile

import pytest

from mtlora_dist.data.errors import DataError, TooManyFailuresError
from mtlora_dist.data.shards.manifest import read_manifest
from mtlora_dist.data.shards.shard_index import shard_info
from mtlora_dist.data.shards.tarshards import TarShardWriter, iter_tar_samples

from datatest_utils import PASCAL, drop_index, keys_of, pascal_loader, valid_keys


def shard_with_samples(folder: str, at_least: int = 2) -> tuple[str, int, list[str]]:
    manifest = read_manifest(folder)
    for shard in manifest.shards:
        if shard.num_samples >= at_least:
            path = os.path.join(folder, shard.name)
            with open(path, "rb") as f:
                keys = [k for k, _ in iter_tar_samples(f)]
            return path, shard.num_samples, keys
    raise AssertionError("no shard with enough samples")


def run_epoch(folder: str, on_error: str = "skip", **kw):
    loader = pascal_loader(folder, num_workers=1, batch_size=2, on_error=on_error, **kw)
    batches = list(loader)
    assert len(batches) == len(loader) == PASCAL["num_train"] // 2  # the batch count never changes
    return batches, loader.stats


def rewrite(path: str, edit) -> None:
    """Rebuild a shard sample by sample, letting ``edit(index, key, members)`` change members, and
    record it in the manifest: bad data that was already bad when converted (the decoders' job)."""
    with open(path, "rb") as f:
        samples = list(iter_tar_samples(f))
    with TarShardWriter(path) as w:
        for i, (key, members) in enumerate(samples):
            w.add(key, edit(i, key, dict(members)))
    manifest_path = os.path.join(os.path.dirname(path), "manifest.json")
    manifest = json.load(open(manifest_path))
    entry = next(s for s in manifest["shards"] if s["name"] == os.path.basename(path))
    info = shard_info(path, entry["name"])
    entry.update(bytes=info.bytes, sha256=info.sha256, offsets=info.offsets, digests=info.digests)
    json.dump(manifest, open(manifest_path, "w"))


def copy(shard_copy, indexed: bool) -> str:
    return shard_copy() if indexed else drop_index(shard_copy())


def check_skipped(batches, stats, lost_keys: list[str], missing: int, skipped: int, failed_shards: int) -> None:
    assert stats["samples_missing"] == missing and stats["samples_skipped"] == skipped
    assert stats["shards_failed"] == failed_shards
    assert stats["samples_padded"] == missing + skipped  # every lost sample replaced by a marked copy
    good = valid_keys(batches)
    assert len(good) == PASCAL["num_train"] - missing - skipped == len(set(good))
    assert not set(good) & set(lost_keys)
    assert len(keys_of(batches)) == PASCAL["num_train"]


@pytest.mark.parametrize("indexed", [True, False])
def test_garbage_shard(shard_copy, indexed):
    folder = copy(shard_copy, indexed)
    path, n, keys = shard_with_samples(folder)
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    if indexed:  # every sample fails its digest
        check_skipped(*run_epoch(folder), keys, missing=0, skipped=n, failed_shards=0)
    else:
        check_skipped(*run_epoch(folder), keys, missing=n, skipped=0, failed_shards=1)
    with pytest.raises(DataError, match=os.path.basename(path)):
        run_epoch(folder, "raise")


@pytest.mark.parametrize("indexed", [True, False])
@pytest.mark.parametrize("verify", [True, False])
def test_tar_cut_at_a_header_is_caught_by_the_count(shard_copy, verify, indexed):
    folder = copy(shard_copy, indexed)
    path, n, keys = shard_with_samples(folder)
    with tarfile.open(path) as tar:
        second = next(m for m in tar.getmembers() if m.name.startswith(keys[1] + "."))
    with open(path, "r+b") as f:
        f.truncate(second.offset)  # what tarfile reads as a clean end of the archive
    with open(path, "rb") as f:
        assert [k for k, _ in iter_tar_samples(f)] == keys[:1]  # silently short without the manifest
    lost = keys if verify and not indexed else keys[1:]  # verified whole: nothing of a damaged shard is used
    check_skipped(*run_epoch(folder, verify_checksums=verify), lost, missing=len(lost), skipped=0, failed_shards=1)
    with pytest.raises(DataError, match=rf"{os.path.basename(path)} is truncated: the tar ended after 1 sample"):
        run_epoch(folder, "raise", verify_checksums=verify)


@pytest.mark.parametrize("indexed", [True, False])
@pytest.mark.parametrize("verify", [True, False])
def test_tar_cut_inside_a_member(shard_copy, verify, indexed):
    folder = copy(shard_copy, indexed)
    path, n, keys = shard_with_samples(folder)
    with tarfile.open(path) as tar:
        normals = next(m for m in tar.getmembers() if m.name == f"{keys[1]}.normals.npy")
    with open(path, "r+b") as f:
        f.truncate(normals.offset_data + normals.size // 2)
    lost = keys if verify and not indexed else keys[1:]
    check_skipped(*run_epoch(folder, verify_checksums=verify), lost, missing=len(lost), skipped=0, failed_shards=1)
    with pytest.raises(DataError, match=os.path.basename(path)):
        run_epoch(folder, "raise", verify_checksums=verify)


def flip_jpeg_bytes(path: str, key: str, count: int = 13) -> None:
    """Change ``count`` bytes in the middle of a sample's JPEG data, in place: the tar stays valid."""
    with tarfile.open(path) as tar:
        jpg = next(m for m in tar.getmembers() if m.name == f"{key}.jpg")
    with open(path, "r+b") as f:
        for i in range(count):
            f.seek(jpg.offset_data + jpg.size // 2 + 7 * i)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x5A]))


@pytest.mark.parametrize("indexed", [True, False])
def test_flipped_bytes_in_a_jpeg_fail_the_checksum(shard_copy, indexed):
    """The case that went through undetected before: 13 bytes of a JPEG changed, the tar still parses
    and the image still decodes (to other pixels). The sample's digest (or, without the index, the
    shard's sha256) catches it."""
    folder = copy(shard_copy, indexed)
    path, n, keys = shard_with_samples(folder)
    flip_jpeg_bytes(path, keys[1])
    unverified, stats = run_epoch(folder, verify_checksums=False, jpeg="pil")
    assert stats["samples_skipped"] == stats["samples_missing"] == stats["shards_failed"] == 0  # unnoticed
    if indexed:  # the damaged sample only
        check_skipped(*run_epoch(folder), [keys[1]], missing=0, skipped=1, failed_shards=0)
        match = rf"{os.path.basename(path)} does not match its manifest: sample 1 .* sha256"
    else:
        check_skipped(*run_epoch(folder), keys, missing=n, skipped=0, failed_shards=1)
        match = rf"{os.path.basename(path)} does not match its manifest: .* sha256"
    with pytest.raises(DataError, match=match):
        run_epoch(folder, "raise")


@pytest.mark.parametrize("indexed", [True, False])
def test_a_worker_that_needs_only_part_of_a_shard_reads_and_verifies_what_it_uses(shard_copy, indexed):
    """Two workers, no shuffling: the shard across the middle of the epoch is needed in part by each
    worker (the plan gives them alternate runs of the epoch). Damage only its last sample. With the index
    each worker reads only its samples' bytes and checks each one: worker 0's part is used, the damaged
    sample is skipped, and the epoch reads the samples' bytes exactly once. Without it, worker 0 (which
    needs only the first sample) must still read and hash the rest, and use none of the shard."""
    folder = copy(shard_copy, indexed)
    manifest = read_manifest(folder)
    half, start = PASCAL["num_train"] // 2, 0
    for shard in manifest.shards:
        if start < half < start + shard.num_samples:
            break
        start += shard.num_samples
    else:
        raise AssertionError("no shard across the middle of the epoch")
    path = os.path.join(folder, shard.name)
    with open(path, "rb") as f:
        keys = [k for k, _ in iter_tar_samples(f)]
    flip_jpeg_bytes(path, keys[-1], count=3)
    worker0_part = keys[: half - start]

    def epoch(**kw):
        loader = pascal_loader(folder, num_workers=2, batch_size=1, shuffle=False, **kw)
        return valid_keys(list(loader)), loader.stats

    unverified, _ = epoch(verify_checksums=False, jpeg="pil")
    assert set(worker0_part) <= set(unverified)  # unverified: the start of the damaged shard is used
    verified, stats = epoch()
    if indexed:
        assert set(keys[:-1]) <= set(verified) and keys[-1] not in verified
        assert stats["samples_skipped"] == 1 and stats["shards_failed"] == stats["samples_missing"] == 0
        used = sum(s.offsets[-1] - s.offsets[0] for s in manifest.shards)  # every sample's bytes, no tar ends
        assert stats["bytes_read"] == used
    else:
        assert not set(keys) & set(verified)
        assert stats["shards_failed"] == 2 and stats["samples_missing"] == len(keys)  # both workers' parts
        assert stats["bytes_read"] >= sum(s.bytes for s in manifest.shards) + shard.bytes  # shared: read twice


def test_corrupt_png_inside_a_shard(shard_copy):
    folder = shard_copy()
    path, _, keys = shard_with_samples(folder)

    def corrupt(i, key, members):
        if i == 1:
            png = bytearray(members["sal.png"])
            at = png.index(b"IDAT") + 8
            png[at] ^= 0xFF
            members["sal.png"] = bytes(png)
        return members

    rewrite(path, corrupt)
    check_skipped(*run_epoch(folder), [keys[1]], missing=0, skipped=1, failed_shards=0)
    with pytest.raises(
        DataError,
        match=rf"bad sample: shard .*{os.path.basename(path)} sample '{keys[1]}' "
        r"member 'sal.png'.*bad CRC",
    ):
        run_epoch(folder, "raise")


def test_corrupt_npy_header_is_skipped_and_named(shard_copy):
    """A damaged .npy header used to escape the skip policy (tokenize.TokenError from numpy's parser)."""
    folder = shard_copy()
    path, _, keys = shard_with_samples(folder)

    def corrupt(i, key, members):
        if i == 0:
            npy = bytearray(members["normals.npy"])
            npy[20:26] = b"(((((("
            members["normals.npy"] = bytes(npy)
        return members

    rewrite(path, corrupt)
    check_skipped(*run_epoch(folder), [keys[0]], missing=0, skipped=1, failed_shards=0)
    with pytest.raises(DataError, match=rf"shard .*{os.path.basename(path)} sample '{keys[0]}' member 'normals.npy'"):
        run_epoch(folder, "raise")


def test_sample_missing_a_task_member(shard_copy):
    folder = shard_copy()
    path, _, keys = shard_with_samples(folder)
    rewrite(path, lambda i, key, m: {k: v for k, v in m.items() if not (i == 0 and k == "normals.npy")})
    check_skipped(*run_epoch(folder), [keys[0]], missing=0, skipped=1, failed_shards=0)
    with pytest.raises(
        DataError, match=rf"{os.path.basename(path)} sample '{keys[0]}' lacks member\(s\) \['normals.npy'\]"
    ):
        run_epoch(folder, "raise")


def test_missing_shard_file(shard_copy):
    folder = shard_copy()
    path, n, keys = shard_with_samples(folder)
    os.remove(path)
    check_skipped(*run_epoch(folder), keys, missing=n, skipped=0, failed_shards=1)
    with pytest.raises(DataError, match="listed in the manifest does not exist"):
        run_epoch(folder, "raise")


def test_stale_manifest_with_fewer_samples_than_the_shard(shard_copy):
    folder = drop_index(shard_copy())  # with the index, the count no longer matches it: next test
    path, n, _ = shard_with_samples(folder)
    manifest_path = os.path.join(folder, "manifest.json")
    manifest = json.load(open(manifest_path))
    entry = next(s for s in manifest["shards"] if s["name"] == os.path.basename(path))
    entry["num_samples"] -= 1
    manifest["num_samples"] -= 1
    json.dump(manifest, open(manifest_path, "w"))
    loader = pascal_loader(folder, num_workers=1, batch_size=1, on_error="raise", shuffle=False)
    with pytest.raises(DataError, match="holds more than the .* samples its manifest lists"):
        list(loader)


def test_a_broken_index_is_named_when_the_manifest_is_read(shard_copy):
    folder = shard_copy()
    path, _, _ = shard_with_samples(folder)
    manifest_path = os.path.join(folder, "manifest.json")
    manifest = json.load(open(manifest_path))
    entry = next(s for s in manifest["shards"] if s["name"] == os.path.basename(path))
    entry["offsets"] = entry["offsets"][:-1]
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(DataError, match=rf"index of shard {os.path.basename(path)} is broken .* --index"):
        pascal_loader(folder)


def test_nothing_readable_is_an_error_even_when_skipping(shard_copy):
    folder = shard_copy()
    for shard in read_manifest(folder).shards:
        with open(os.path.join(folder, shard.name), "wb") as f:
            f.write(b"\0garbage" * 100)
    with pytest.raises(TooManyFailuresError, match="no sample of this worker's share"):
        run_epoch(folder)
