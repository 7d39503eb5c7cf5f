"""storage/atomic.py: a reader sees the old file or the whole new one; nothing is left behind."""

from __future__ import annotations

import pytest

from mtlora_dist.storage import atomic
from mtlora_dist.storage.atomic import atomic_write, atomic_write_text
from mtlora_dist.storage.fs import StorageOptions, url_to_fs


def test_local_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "file.json"
    atomic_write(str(target), b"first")
    atomic_write_text(str(target), "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "file.bin"
    atomic_write(str(target), b"old")
    with pytest.raises(TypeError):
        atomic_write(str(target), "not bytes")  # fails inside the write
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_s3_write_is_one_object(s3_bucket):
    url = f"s3://{s3_bucket}/runs/x/metrics.jsonl"
    atomic_write(url, b"a\n")
    atomic_write(url, b"a\nb\n")
    fs, path = url_to_fs(url, StorageOptions())
    fs.invalidate_cache()
    assert fs.cat_file(path) == b"a\nb\n"
    assert fs.find(f"{s3_bucket}/runs/x") == [path]


def test_a_written_file_gets_the_mode_of_any_new_file(tmp_path):
    """0666 less the umask (0644 under the usual 022), not mkstemp's 0600: run folders are shared."""
    atomic_write(str(tmp_path / "shared.txt"), b"x")
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK
