"""Streaming from a real S3-compatible server on 127.0.0.1 (rclone serve s3, or moto).

Ranks are simulated in one process (loaders with rank 0/1 of 2); workers are real DataLoader workers.
"""

from __future__ import annotations

import os
import time

import pytest

from mtlora_dist.data.errors import StorageUnavailableError
from mtlora_dist.data.ingest.convert import convert
from mtlora_dist.data.shards.manifest import read_manifest
from mtlora_dist.storage.fs import StorageOptions

from datatest_utils import PASCAL, assert_batches_equal, keys_of, pascal_loader, upload, valid_keys
from latency_proxy import LatencyProxy
from s3_server import KEY, SECRET, S3Server

pytestmark = pytest.mark.integration


def test_two_ranks_two_workers_from_s3(pascal_shards, s3_bucket):
    url = upload(pascal_shards["train"], f"s3://{s3_bucket}/pascal/train")
    loaders = [pascal_loader(url, num_workers=2, rank=r, world_size=2, batch_size=3, seed=2) for r in range(2)]
    orders = []
    for epoch in (0, 1):
        keys = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == PASCAL["num_train"] // 6
            keys += keys_of(batches)
        assert sorted(keys) == sorted(set(keys)) and len(keys) == PASCAL["num_train"]
        orders.append(keys)
    assert orders[0] != orders[1]
    assert loaders[0].stats["retries"] == 0 and loaders[0].stats["samples_missing"] == 0
    # ranged reads of the indexed shards: the two epochs fetched every sample's bytes twice, nothing more
    shards = read_manifest(url).shards
    assert sum(ldr.stats["bytes_read"] for ldr in loaders) == 2 * sum(s.offsets[-1] - s.offsets[0] for s in shards)
    # the bucket yields exactly what the same shards on disk yield
    local = pascal_loader(pascal_shards["train"], num_workers=2, rank=1, world_size=2, batch_size=3, seed=2)
    remote = pascal_loader(url, num_workers=2, rank=1, world_size=2, batch_size=3, seed=2)
    assert_batches_equal(list(local), list(remote))


def test_resume_from_s3(pascal_root, s3_bucket):
    url = f"s3://{s3_bucket}/pascal/train"
    convert("pascal_context", pascal_root, "train", url, shard_size_mb=0.12)

    def make():
        return pascal_loader(url, num_workers=2, rank=0, world_size=2, batch_size=2, seed=4)

    reference = make()
    reference.set_epoch(1)
    expected = list(reference)
    interrupted = make()
    interrupted.set_epoch(1)
    it = iter(interrupted)
    for _ in range(3):
        next(it)
    state = interrupted.state_dict()
    del it
    resumed = make()
    resumed.load_state_dict(state)
    assert_batches_equal(list(resumed), expected[3:])


@pytest.fixture
def private_s3(tmp_path, monkeypatch):
    """A server of our own, so a test may stop and restart it."""
    for name in ("AWS_RESPONSE_CHECKSUM_VALIDATION", "AWS_REQUEST_CHECKSUM_CALCULATION"):
        monkeypatch.setenv(name, "when_required")  # rclone's answers to ranged reads (also run alone)
    server = S3Server(os.environ.get("MTLORA_TEST_S3", "rclone"), tmp_path / "s3data").start()
    server.make_bucket("data")
    yield server
    server.stop()


def storage_for(server: S3Server, **kw) -> StorageOptions:
    base = dict(endpoint_url=server.endpoint, key=KEY, secret=SECRET, retries=0, read_retries=2, retry_delay_s=0.05)
    base.update(kw)
    return StorageOptions(**base)


@pytest.fixture
def tiny_shards(pascal_root, tmp_path_factory) -> str:
    """One sample per shard: the server can be stopped between shards."""
    folder = str(tmp_path_factory.mktemp("tiny"))
    convert("pascal_context", pascal_root, "train", folder, shard_size_mb=0.01)
    return folder


ONE_SAMPLE_MB = 0.05  # the reader holds one ~45 kB sample ahead: it is still reading when the server stops


def stop_after_first_batch(loader, server):
    batches = []
    it = iter(loader)
    batches.append(next(it))
    server.stop()
    started = time.monotonic()
    try:
        for batch in it:
            batches.append(batch)
    finally:
        elapsed = time.monotonic() - started
    return batches, elapsed


def test_stopped_server_is_retried_then_a_clear_error(tiny_shards, private_s3):
    storage = storage_for(private_s3)
    url = upload(tiny_shards, "s3://data/tiny", storage)
    loader = pascal_loader(
        url, storage=storage, on_error="raise", prefetch_samples=1, buffer_mb=ONE_SAMPLE_MB, shuffle_buffer=2
    )
    with pytest.raises(StorageUnavailableError) as err:
        stop_after_first_batch(loader, private_s3)
    message = str(err.value)
    assert "s3://data/tiny/train-0000" in message and "after 3 attempt(s)" in message
    assert f"endpoint {private_s3.endpoint}" in message and "credentials" in message


def test_stopped_server_while_skipping_counts_every_lost_sample(tiny_shards, private_s3):
    storage = storage_for(private_s3)
    url = upload(tiny_shards, "s3://data/tiny", storage)
    loader = pascal_loader(
        url,
        storage=storage,
        prefetch_samples=1,
        buffer_mb=ONE_SAMPLE_MB,
        shuffle_buffer=2,
        max_consecutive_failures=1000,
    )
    batches, _ = stop_after_first_batch(loader, private_s3)
    stats = loader.stats
    assert len(batches) == len(loader)  # same number of steps as every other rank
    assert stats["shards_failed"] > 0 and stats["samples_missing"] == stats["shards_failed"]  # 1 sample per shard
    assert stats["retries"] == 2 * stats["shards_failed"]
    assert stats["samples_padded"] == stats["samples_missing"]
    assert len(valid_keys(batches)) == PASCAL["num_train"] - stats["samples_missing"]

    private_s3.start()
    if not private_s3.persistent:  # moto forgets everything on a restart
        private_s3.make_bucket("data")
        upload(tiny_shards, "s3://data/tiny", storage)
    loader = pascal_loader(
        url, storage=storage, prefetch_samples=1, buffer_mb=ONE_SAMPLE_MB, shuffle_buffer=2
    )  # default: give up after 3 shards in a row
    with pytest.raises(StorageUnavailableError, match="3 shards in a row could not be read"):
        stop_after_first_batch(loader, private_s3)
    # what happened before it gave up is in the stats (issue 33 item 18: counters that travelled only
    # with delivered batches showed 0 retries and 0 missing here)
    stats = loader.stats
    assert stats["shards_failed"] == 3 and stats["samples_missing"] >= 3 and stats["retries"] == 2 * 3


def test_server_back_within_the_retries_loses_nothing(tiny_shards, private_s3):
    if not private_s3.persistent:
        pytest.skip("moto keeps objects in memory: a restarted server is empty")
    storage = storage_for(private_s3, read_retries=6, retry_delay_s=0.2)
    url = upload(tiny_shards, "s3://data/tiny", storage)
    loader = pascal_loader(
        url,
        storage=storage,
        num_workers=1,
        prefetch_samples=1,
        buffer_mb=ONE_SAMPLE_MB,
        prefetch_batches=1,
        shuffle_buffer=2,
    )
    it = iter(loader)
    batches = [next(it)]
    private_s3.stop()  # the worker keeps reading ahead meanwhile, and fails
    time.sleep(1.0)
    private_s3.start()  # from the main thread: the server dies with the thread that started it
    batches += list(it)
    assert len(batches) == len(loader)
    assert (
        sorted(valid_keys(batches)) == sorted(set(keys_of(batches))) and len(valid_keys(batches)) == PASCAL["num_train"]
    )
    assert loader.stats["retries"] > 0 and loader.stats["samples_missing"] == 0


def test_unreachable_endpoint_names_url_and_what_to_check(pascal_shards, private_s3):
    private_s3.stop()
    storage = storage_for(private_s3, read_retries=1)
    with pytest.raises(
        StorageUnavailableError,
        match=r"could not read s3://data/x/manifest.json at endpoint "
        r"http://127.0.0.1:\d+ \(StorageOptions.endpoint_url\)",
    ):
        pascal_loader("s3://data/x", storage=storage)


def test_wrong_credentials_are_not_retried(pascal_shards, private_s3):
    if private_s3.backend != "rclone":
        pytest.skip("moto accepts any credentials")
    url = upload(pascal_shards["val"], "s3://data/val", storage_for(private_s3))
    storage = storage_for(private_s3, secret="wrong-secret", read_retries=5, retry_delay_s=5)
    started = time.monotonic()
    with pytest.raises(PermissionError, match="check the credentials"):
        pascal_loader(url, storage=storage, split="val")
    assert time.monotonic() - started < 5


@pytest.fixture
def counted_s3(pascal_shards, private_s3):
    """The PASCAL train shards in a bucket, reached through a proxy on the server's side that logs every
    request the server receives (and, where asked, adds object-storage latency)."""
    url = upload(pascal_shards["train"], "s3://data/pascal", storage_for(private_s3))
    proxy = LatencyProxy(private_s3.port, delay_s=0.0).start()
    yield url, proxy, storage_for(private_s3, endpoint_url=proxy.endpoint)
    proxy.stop()


def test_the_server_receives_one_ranged_get_per_sample_and_no_head(counted_s3):
    """Counted at the server: per sample at most 1.1 GET requests, the bytes of the samples used and not
    one more, and no HEAD (sizes come from the manifest); in the main process and with 2 workers."""
    url, proxy, storage = counted_s3
    proxy.delay_s = 0.02  # requests overlap, as from object storage
    used = sum(s.offsets[-1] - s.offsets[0] for s in read_manifest(url, storage).shards)
    for num_workers in (0, 2):
        loader = pascal_loader(url, storage=storage, num_workers=num_workers, buffer_mb=0.1, seed=1)
        proxy.reset()  # the manifest's own requests
        batches = list(loader)
        requests = proxy.reset()
        assert len(valid_keys(batches)) == len(set(keys_of(batches))) == PASCAL["num_train"]
        gets = [r for r in requests if r.method == "GET"]
        assert [r for r in requests if r.method != "GET"] == []  # no HEAD, nothing else
        assert all(r.status in (200, 206) and r.range.startswith("bytes=") for r in gets)  # rclone answers 200
        assert len(gets) <= 1.1 * PASCAL["num_train"]
        assert sum(r.body_bytes for r in gets) == used == loader.stats["bytes_read"]
        assert loader.stats["read_requests"] == len(gets)
