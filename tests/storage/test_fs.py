"""fsspec access to local paths and a real S3 server; webdataset's s3:// handler."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import webdataset as wds

from mtlora_dist.storage.fs import (
    StorageOptions,
    describe_endpoint,
    is_remote,
    join,
    redact,
    url_to_fs,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_paths_stay_strings_and_keep_the_scheme():
    assert join("s3://bucket/a/", "/b", "c.tar") == "s3://bucket/a/b/c.tar"
    assert join("/tmp/x", "y") == "/tmp/x/y"
    assert is_remote("s3://b/k") and not is_remote("/tmp/x") and not is_remote("file:///tmp/x")


def test_storage_options_and_redaction(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1234")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    kwargs = StorageOptions(retries=2).s3_kwargs()
    assert kwargs["endpoint_url"] == "http://127.0.0.1:1234" and kwargs["key"] == "env-key"
    assert kwargs["use_listings_cache"] is False  # another process's new files show up in a listing
    assert kwargs["config_kwargs"]["retries"]["max_attempts"] == 2
    assert StorageOptions(endpoint_url="http://h:1").s3_kwargs()["endpoint_url"] == "http://h:1"
    assert "StorageOptions.endpoint_url" in describe_endpoint(StorageOptions(endpoint_url="http://h:1"))
    assert redact({"key": "AKIA", "secret": "s", "nested": {"aws_secret_access_key": "x"}, "endpoint_url": "e"}) == {
        "key": "***",
        "secret": "***",
        "nested": {"aws_secret_access_key": "***"},
        "endpoint_url": "e",
    }


def test_filesystems_are_reused_per_settings(tmp_path, s3_server, monkeypatch):
    (tmp_path / "f.txt").write_text("hi")
    fs1, path = url_to_fs(str(tmp_path / "f.txt"))
    fs2, _ = url_to_fs(f"file://{tmp_path}/f.txt")
    assert fs1 is fs2 and fs1.cat_file(path) == b"hi"
    first = url_to_fs("s3://b/x")[0]
    assert url_to_fs("s3://b/y")[0] is first  # one client (and connection pool) for many shards
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-key")
    assert url_to_fs("s3://b/x")[0] is not first  # changed credentials: a new client


def test_s3_round_trip_through_env_and_options(s3_server, s3_bucket):
    fs, path = url_to_fs(f"s3://{s3_bucket}/dir/obj.bin")
    fs.pipe_file(path, b"payload")
    assert fs.cat_file(path) == b"payload"
    explicit = StorageOptions(endpoint_url=s3_server.endpoint)
    fs2, path2 = url_to_fs(f"s3://{s3_bucket}/dir/obj.bin", explicit)
    assert fs2.cat_file(path2) == b"payload"
    assert url_to_fs(f"s3://{s3_bucket}/other", explicit)[0] is fs2


def _first_keys(url):
    dataset = wds.WebDataset(url, shardshuffle=False, empty_check=False).to_tuple("__key__")
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    return sorted(k for (k,) in loader)


def test_webdataset_reads_s3_urls_in_workers(s3_bucket, tmp_path):
    import mtlora_dist.storage.wds  # noqa: F401  (registers the s3 scheme)
    from mtlora_dist.data.shards.tarshards import TarShardWriter

    fs, _ = url_to_fs(f"s3://{s3_bucket}")
    urls = []
    for shard in range(2):
        local = str(tmp_path / f"s{shard}.tar")
        with TarShardWriter(local) as w:
            for i in range(3):
                w.add(f"k{shard}_{i}", [("txt", f"{shard}-{i}".encode())])
        fs.put_file(local, f"{s3_bucket}/wds/s{shard}.tar")
        urls.append(f"s3://{s3_bucket}/wds/s{shard}.tar")
    assert wds.gopen_schemes["s3"].__module__ == "mtlora_dist.storage.wds"
    assert _first_keys(urls) == [f"k{s}_{i}" for s in range(2) for i in range(3)]


def test_forked_workers_do_not_inherit_s3_session_cleanup(s3_bucket):
    """A parent's S3 client collected in a forked child must neither block nor spill asyncio errors."""
    code = (
        "import gc, os, sys, time\n"
        "from mtlora_dist.storage.fs import url_to_fs\n"
        "gc.disable()\n"
        f"fs, p = url_to_fs('s3://{s3_bucket}/x'); fs.pipe_file(p, b'1')\n"
        "cycle = [fs]; cycle.append(cycle); del fs, cycle  # garbage that only gc frees\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    fs2, p2 = url_to_fs(p and 's3://' + p)\n"
        "    assert fs2.cat_file(p2) == b'1'\n"
        "    t = time.time(); gc.collect(); fs2.cat_file(p2)\n"
        "    sys.stderr.write(f'gc took {time.time() - t:.2f} s\\n'); sys.stderr.flush(); os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert out.returncode == 0, out.stderr
    for noise in ("different loop", "Unclosed", "Traceback"):
        assert noise not in out.stderr, out.stderr
    took = float(out.stderr.split("gc took ")[1].split(" s")[0])
    assert took < 0.5, out.stderr  # unfixed: s3fs waits on the parent's dead loop


@pytest.mark.parametrize("url", ["relative/dir", "/abs/dir"])
def test_local_url_to_fs(url):
    fs, path = url_to_fs(url)
    assert path.endswith("dir") and not is_remote(url)


@pytest.mark.parametrize(
    "text, masked",
    [
        ("s3://AKID:ab/cd@bkt/train", "s3://***@bkt/train"),  # issue 33 item 14: a secret with '/'
        ("read s3://AKID:a@b/c+d@bkt/x, then", "read s3://***@bkt/x, then"),  # '@' and '/' in the secret
        ("s3://KEY@bkt/x", "s3://***@bkt/x"),
        ("http://user:pw@host:9000/x", "http://***@host:9000/x"),
        ("s3://bkt/dir@v2/x", "s3://bkt/dir@v2/x"),  # an '@' in a path is no user-info
        ("http://127.0.0.1:9000/b/x@y", "http://127.0.0.1:9000/b/x@y"),  # nor is a port
    ],
)
def test_user_info_runs_to_the_last_at_sign_of_the_url(text, masked):
    from mtlora_dist.storage.fs import has_userinfo, redact, redact_userinfo

    assert redact_userinfo(text) == masked
    assert has_userinfo(text) == (masked != text)
    assert redact({"data": {"train_url": text}}) == {"data": {"train_url": masked}}  # what config.yaml gets
