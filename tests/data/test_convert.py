"""Conversion to shards: manifest, target sizes, byte-identical re-runs, local and S3 output."""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import subprocess
import sys
import tarfile

import pytest

from mtlora_dist.data.ingest.convert import convert
from mtlora_dist.data.shards.manifest import read_manifest, verify_shards
from mtlora_dist.storage.fs import StorageOptions, url_to_fs

from datatest_utils import PASCAL, PASCAL_TASKS, SHARD_MB

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_manifest_describes_the_shards(pascal_shards):
    folder = pascal_shards["train"]
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["dataset"] == "pascal_context" and manifest["split"] == "train"
    assert manifest["tasks"] == PASCAL_TASKS
    assert manifest["num_outputs"] == {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1}
    assert len(manifest["class_names"]["semseg"]) == 21 and manifest["encoding_version"] == 1
    assert manifest["encodings"]["normals"] == "npy:float16:HxWx3"
    shards = manifest["shards"]
    assert len(shards) >= 6
    assert sum(s["num_samples"] for s in shards) == manifest["num_samples"] == PASCAL["num_train"]
    names = sorted(f for f in os.listdir(folder) if f.endswith(".tar"))
    assert names == [s["name"] for s in shards] == [f"train-{i:06d}.tar" for i in range(len(shards))]
    keys = []
    for s in shards:
        path = os.path.join(folder, s["name"])
        assert os.path.getsize(path) == s["bytes"] and _sha(path) == s["sha256"]
        with tarfile.open(path) as tar:
            members = tar.getnames()
        sample_keys = list(dict.fromkeys(m.split(".")[0] for m in members))
        assert len(sample_keys) == s["num_samples"]
        # size target: only a single-sample shard may exceed it
        assert s["num_samples"] == 1 or s["bytes"] <= SHARD_MB * 1024 * 1024 + 10240
        keys += sample_keys
    assert keys == sorted(keys) and len(set(keys)) == PASCAL["num_train"]  # split-file order, no repeats


def test_rerun_is_byte_identical(pascal_root, pascal_shards, tmp_path):
    again = convert("pascal_context", pascal_root, "train", str(tmp_path / "again"), shard_size_mb=SHARD_MB, workers=2)
    first = json.load(open(os.path.join(pascal_shards["train"], "manifest.json")))
    assert again == first
    for s in first["shards"]:
        assert (tmp_path / "again" / s["name"]).read_bytes() == open(
            os.path.join(pascal_shards["train"], s["name"]), "rb"
        ).read()
    assert (
        open(tmp_path / "again" / "manifest.json").read()
        == open(os.path.join(pascal_shards["train"], "manifest.json")).read()
    )


def test_task_subset_and_cli(pascal_root, tmp_path):
    out = str(tmp_path / "subset")
    proc = subprocess.run(
        [
            sys.executable,
            "launch/convert.py",
            "pascal_context",
            "--root",
            pascal_root,
            "--split",
            "val",
            "--out",
            out,
            "--shard-size-mb",
            "1",
            "--tasks",
            "semseg",
            "normals",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(out)
    assert manifest.tasks == ["semseg", "normals"] and manifest.num_samples == PASCAL["num_val"]
    with tarfile.open(os.path.join(out, manifest.shards[0].name)) as tar:
        suffixes = {n.split(".", 1)[1] for n in tar.getnames()}
    assert suffixes == {"jpg", "semseg.png", "normals.npy"}
    assert verify_shards(manifest) == []


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(REPO, "launch"))
    monkeypatch.setattr(
        sys,
        "argv",
        ["convert.py", "nyud", "--root", str(tmp_path / "none"), "--split", "train", "--out", str(tmp_path / "out")],
    )
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(REPO, "launch", "convert.py"), run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: nyud root folder not found")


def test_verify_shards_finds_damage(shard_copy):
    folder = shard_copy()
    manifest = read_manifest(folder)
    path = os.path.join(folder, manifest.shards[1].name)
    data = bytearray(open(path, "rb").read())
    data[700] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert verify_shards(manifest) == [manifest.shards[1].name]


def test_convert_into_s3_bucket(pascal_root, pascal_shards, s3_bucket):
    url = f"s3://{s3_bucket}/pascal/train"
    manifest = convert("pascal_context", pascal_root, "train", url, shard_size_mb=SHARD_MB)
    local = json.load(open(os.path.join(pascal_shards["train"], "manifest.json")))
    assert manifest == local  # same bytes whether the shards go to disk or to a bucket
    fs, path = url_to_fs(url, StorageOptions())
    listed = sorted(p.rsplit("/", 1)[1] for p in fs.ls(path))
    assert listed == sorted([s["name"] for s in local["shards"]] + ["manifest.json"])
    remote = read_manifest(url)
    assert remote.base_url == url and verify_shards(remote) == []
    again = convert("pascal_context", pascal_root, "train", url + "/", shard_size_mb=SHARD_MB)
    assert again == local
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(path, refresh=True)) == listed  # no nested copy


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(str(tmp_path))
