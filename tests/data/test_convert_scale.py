"""Conversion at scale: parts merged into one manifest, resume after a kill, settings checks, workers.

The reference for "byte-identical" is the session's uninterrupted single-part conversion of the synthetic
PASCAL set (``pascal_shards``, written by ``convert`` with ``SHARD_MB``: about two samples a shard).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtlora_dist.data.ingest.convert import convert, main, part_from_env
from mtlora_dist.data.ingest.convert_parts import ConversionMismatchError, PartLocation, merge_parts, part_bounds
from mtlora_dist.data.ingest.formats import get_reader
from mtlora_dist.data.shards.manifest import read_manifest, verify_shards

from datatest_utils import PASCAL, PASCAL_TASKS, SHARD_MB, epoch_batches, pascal_loader, valid_keys

REPO = Path(__file__).resolve().parents[2]
JOURNAL = "_parts/part-00000-of-00001.json"


# ------------------------------------------------------------------------------------------ helpers
def files(folder: str | Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    root = Path(folder)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def stats(folder: str | Path) -> dict[str, tuple[int, int, int]]:
    """``(inode, size, mtime_ns)`` per file: a rewritten file changes its mtime."""
    root = Path(folder)
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def tar_keys(folder: str | Path, manifest: dict) -> list[str]:
    keys = []
    for shard in manifest["shards"]:
        with tarfile.open(os.path.join(folder, shard["name"])) as tar:
            keys += list(dict.fromkeys(m.split(".")[0] for m in tar.getnames()))
    return keys


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/convert.py", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def pascal_args(root: str, out: str | Path, *extra: str) -> list[str]:
    return [
        "pascal_context",
        "--root",
        root,
        "--split",
        "train",
        "--out",
        str(out),
        "--shard-size-mb",
        str(SHARD_MB),
        *extra,
    ]


# launch/convert.py with every sample slowed down, so that a kill lands in the middle of the conversion
SLOW_CLI = """
import runpy, sys, time
sys.path.insert(0, "launch")
import mtlora_dist.data.ingest.convert as convert
encoded = convert._encoded
def slow(context, sample_id):
    time.sleep(0.06)
    return encoded(context, sample_id)
convert._encoded = slow
sys.argv = ["launch/convert.py", *sys.argv[1:]]
runpy.run_path("launch/convert.py", run_name="__main__")
"""


def kill_after_shards(args: list[str], journal: Path, shards: int, tmp: Path, timeout: float = 60) -> dict:
    """Run the slowed CLI, SIGKILL its whole process group (the main process and its encoding workers,
    as a node failure or SLURM would) once the journal lists ``shards`` finished shards; the journal then.
    ``tmp``: its TMPDIR, where a killed conversion leaves its temporary shard folder."""
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *args], cwd=REPO, start_new_session=True, env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if journal.exists():
                record = json.loads(journal.read_text())  # written atomically: never half a file
                if len(record["shards"]) >= shards:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    assert not record["complete"], "the conversion finished before it could be killed"
                    return record
            assert proc.poll() is None, f"the conversion ended on its own: {proc.stderr.read().decode()[-2000:]}"
            time.sleep(0.005)
        raise AssertionError(f"no journal with {shards} shards after {timeout} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def three_parts(pascal_root, tmp_path_factory) -> str:
    """The PASCAL train split converted as 3 parts (one process each, out of order), merged by the last."""
    out = str(tmp_path_factory.mktemp("parts") / "train")
    results = {}
    for part in (2, 0, 1):
        results[part] = convert(
            "pascal_context", pascal_root, "train", out, SHARD_MB, part=part, num_parts=3, resume=True
        )
    assert results[2]["part"] == 2 and results[2]["complete"] and results[0]["part"] == 0  # not merged yet
    assert results[1] == json.loads(Path(out, "manifest.json").read_text())  # the last one merged
    return out


# ------------------------------------------------------------------------------------------ resume
def test_killed_conversion_resumes_byte_identical(pascal_root, pascal_shards, tmp_path):
    """A real SIGKILL mid-way, then the same command: finished shards are kept as they are, the rest is
    written, and the folder is byte for byte the uninterrupted conversion's."""
    out = tmp_path / "train"
    args = pascal_args(pascal_root, out, "--workers", "2")
    record = kill_after_shards(args, out / JOURNAL, shards=2, tmp=tmp_path / "tmp")
    assert not (out / "manifest.json").exists()
    finished = [s["name"] for s in record["shards"]]
    before = stats(out)
    assert set(finished) <= set(before)

    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    reference = files(pascal_shards["train"])
    assert files(out) == reference  # shards and manifest.json; the single part's journal is gone once merged
    after = stats(out)
    assert all(after[name] == before[name] for name in finished), "a finished shard was rewritten"
    rewritten = [n for n in reference if n.endswith(".tar") and n not in finished]
    assert rewritten and f"wrote {out}/{rewritten[0]}" in proc.stderr


def test_shard_stored_but_not_journaled_is_written_again(pascal_root, pascal_shards, tmp_path, monkeypatch):
    """Dying between a shard's upload and its journal entry: the resume writes that shard again, same bytes."""
    out = str(tmp_path / "train")
    write = PartLocation.write_journal
    calls = []

    def dies_on_third(self, journal):  # 1: the empty journal, 2: shard 0, 3: shard 1 (already uploaded)
        calls.append(len(journal.shards))
        if len(calls) == 3:
            raise OSError("disk gone")
        write(self, journal)

    monkeypatch.setattr(PartLocation, "write_journal", dies_on_third)
    with pytest.raises(OSError, match="disk gone"):
        convert("pascal_context", pascal_root, "train", out, SHARD_MB, resume=True)
    monkeypatch.setattr(PartLocation, "write_journal", write)
    journal = json.loads(Path(out, JOURNAL).read_text())
    assert [s["name"] for s in journal["shards"]] == ["train-000000.tar"]
    assert Path(out, "train-000001.tar").exists()  # stored, not recorded
    kept = stats(out)["train-000000.tar"]

    manifest = convert("pascal_context", pascal_root, "train", out, SHARD_MB, resume=True)
    assert manifest == json.loads(Path(pascal_shards["train"], "manifest.json").read_text())
    assert files(out) == files(pascal_shards["train"])
    assert stats(out)["train-000000.tar"] == kept


# ------------------------------------------------------------------------------------------ parts
def test_part_bounds_tile_the_ids():
    for n, parts in ((24, 3), (10, 4), (3, 5), (1, 1)):
        bounds = [part_bounds(n, i, parts) for i in range(parts)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    with pytest.raises(ValueError, match="0 <= part < num_parts"):
        part_bounds(10, 3, 3)


def test_three_parts_merge_into_one_manifest(three_parts, pascal_root):
    manifest = read_manifest(three_parts)
    ids = get_reader("pascal_context", pascal_root).ids("train")
    raw = json.loads(Path(three_parts, "manifest.json").read_text())
    assert tar_keys(three_parts, raw) == ids  # every sample once, in split order (parts in part order)
    assert manifest.num_samples == PASCAL["num_train"] and manifest.tasks == PASCAL_TASKS
    names = [s.name for s in manifest.shards]
    assert names[0] == "train-p00000-of-00003-000000.tar" and names == sorted(names)
    assert verify_shards(manifest) == []
    loader = pascal_loader(three_parts, split="val", batch_size=4)
    assert sorted(valid_keys(epoch_batches(loader))) == sorted(ids)  # the merged folder streams


def test_merge_on_demand_is_idempotent(three_parts, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(three_parts, folder)
    merged = (folder / "manifest.json").read_bytes()
    (folder / "manifest.json").unlink()
    assert main(["--merge", "--out", str(folder)])["num_samples"] == PASCAL["num_train"]
    assert (folder / "manifest.json").read_bytes() == merged
    assert "24 samples in" in capsys.readouterr().out
    before = stats(folder)
    merge_parts(str(folder))  # two parts merging at once write the same bytes; an equal manifest is kept
    assert stats(folder) == before


def test_merge_names_an_unfinished_part(three_parts, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(three_parts, folder)
    (folder / "_parts" / "part-00001-of-00003.json").unlink()
    proc = cli("--merge", "--out", str(folder))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: cannot merge {folder}: part 1 of 3 has not started")


def test_merge_refuses_parts_with_other_settings(pascal_root, tmp_path):
    out = str(tmp_path / "train")
    for part in (0, 1):
        convert("pascal_context", pascal_root, "train", out, SHARD_MB, part=part, num_parts=3, resume=True)
    with pytest.raises(ConversionMismatchError, match=r"part 2 was converted with other settings than part 0: "
                       r"shard_size_bytes: 125829 in part 0, 209715 in part 2"):  # fmt: skip
        convert("pascal_context", pascal_root, "train", out, 0.2, part=2, num_parts=3, resume=True)
    assert not Path(out, "manifest.json").exists()


def test_parallel_workers_are_byte_identical(three_parts, pascal_root, tmp_path):
    out = str(tmp_path / "train")
    for part in range(3):
        convert("pascal_context", pascal_root, "train", out, SHARD_MB, workers=2, part=part, num_parts=3)
    assert files(out) == files(three_parts)


# ------------------------------------------------------------------------------------------ re-runs
def test_complete_folder_rerun_rewrites_nothing(pascal_root, shard_copy, three_parts, tmp_path):
    single = shard_copy()
    before = stats(single)
    proc = cli(*pascal_args(pascal_root, single))
    assert proc.returncode == 0, proc.stderr
    assert "is already converted (manifest.json): nothing rewritten" in proc.stderr
    assert stats(single) == before
    proc = cli(*pascal_args(pascal_root, single, "--tasks", "semseg"))  # other settings: refused, not rewritten
    assert proc.returncode == 2 and "manifest.json was converted with other settings: tasks: [" in proc.stderr
    assert stats(single) == before

    parts = tmp_path / "parts"
    shutil.copytree(three_parts, parts)
    before = stats(parts)
    proc = cli(*pascal_args(pascal_root, parts, "--part", "1", "--num-parts", "3"))
    assert proc.returncode == 0, proc.stderr
    assert "part 1 of 3 is already converted: nothing rewritten" in proc.stderr
    assert f"{PASCAL['num_train']} samples in" in proc.stdout  # all parts done: the merged manifest
    assert stats(parts) == before


def test_resume_with_other_settings_is_refused_then_restarted(pascal_root, pascal_shards, tmp_path, monkeypatch):
    out = tmp_path / "train"
    write = PartLocation.write_journal

    def dies_after_two_shards(self, journal):
        write(self, journal)
        if len(journal.shards) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartLocation, "write_journal", dies_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        convert("pascal_context", pascal_root, "train", str(out), SHARD_MB, resume=True)
    monkeypatch.undo()
    assert len(json.loads((out / JOURNAL).read_text())["shards"]) == 2

    proc = cli(*pascal_args(pascal_root, out, "--tasks", "semseg", "normals"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr.strip()
    assert err.startswith(f"error: {out} (part 0 of 1) was started with other settings: ")
    assert "tasks: ['semseg', 'human_parts', 'sal', 'normals', 'edge'] in the folder, ['semseg', 'normals'] here" in err
    assert "--restart" in err

    proc = cli(*pascal_args(pascal_root, out, "--num-parts", "2", "--part", "0"))  # another cut: refused too
    assert proc.returncode == 2 and "conversion into [1] part(s), not 2" in proc.stderr

    proc = cli(*pascal_args(pascal_root, out, "--tasks", "semseg", "normals", "--restart"))
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(str(out))
    assert manifest.tasks == ["semseg", "normals"] and verify_shards(manifest) == []
    # the old shards are gone: the folder holds exactly the new conversion
    assert sorted(files(out)) == sorted([s.name for s in manifest.shards] + ["manifest.json"])


def test_slurm_array_task_picks_its_part(monkeypatch):
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert part_from_env(None, None, env) == (2, 4)
    assert part_from_env(1, 3, env) == (1, 3)  # given on the command line: wins
    assert part_from_env(None, None, {}) == (0, 1)
    with pytest.raises(ValueError, match="contiguous --array"):
        part_from_env(None, None, {**env, "SLURM_ARRAY_TASK_ID": "9"})
    with pytest.raises(ValueError, match="--part and --num-parts together"):
        part_from_env(2, None, {})


# ------------------------------------------------------------------------------------------ declared dataset
DECLARED = """\
dataset: scale_demo
tasks: [semseg, lane]
format:
  image: images/{split}/{id}.jpg
  tasks:
    semseg: {kind: class_map, file: 'labels/{split}/{id}.png', num_classes: 3}
    lane: {kind: binary_map, file: 'lane/{split}/{id}.png', optional: true}
"""


def make_declared(root: Path, n: int) -> Path:
    """``n`` train samples of a declared dataset; every third has no ``lane`` label."""
    rng = np.random.default_rng(0)
    for i in range(n):
        ids = rng.integers(0, 3, (24, 32), dtype=np.uint8)
        for rel, array in (
            (f"images/train/s{i:03d}.jpg", np.stack([ids * 80] * 3, -1)),
            (f"labels/train/s{i:03d}.png", ids),
        ):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / rel)
        if i % 3 != 2:
            (root / "lane/train").mkdir(parents=True, exist_ok=True)
            Image.fromarray((ids == 1).astype(np.uint8) * 255).save(root / f"lane/train/s{i:03d}.png")
    config = root / "scale_demo.yaml"
    config.write_text(DECLARED)
    return config


def test_declared_dataset_in_parts_from_a_data_config(tmp_path):
    """DATASET as a data config path; the parts' labels_missing counts add up in the merged manifest."""
    root = tmp_path / "raw"
    config = make_declared(root, 12)
    out = tmp_path / "out"
    for part in range(3):
        proc = cli(str(config), "--root", str(root), "--split", "train", "--out", str(out), "--shard-size-mb", "0.004",
                   "--part", str(part), "--num-parts", "3")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "scale_demo" and manifest["num_samples"] == 12
    assert manifest["labels_missing"] == {"lane": 4} and manifest["optional_tasks"] == ["lane"]
    assert tar_keys(out, manifest) == [f"s{i:03d}" for i in range(12)]

    proc = cli("no_such_config", "--root", str(root), "--split", "train", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: no data config 'no_such_config'")


# ------------------------------------------------------------------------------------------ object storage
def test_parts_and_resume_in_a_bucket(pascal_root, three_parts, s3_bucket):
    """The same records, merge and resume through s3fs: the merged manifest is the local one."""
    from mtlora_dist.storage.fs import StorageOptions, url_to_fs

    url = f"s3://{s3_bucket}/pascal/train"
    for part in range(3):
        result = convert("pascal_context", pascal_root, "train", url, SHARD_MB, part=part, num_parts=3, resume=True)
    assert result == json.loads(Path(three_parts, "manifest.json").read_text())
    fs, path = url_to_fs(url, StorageOptions())
    listed = sorted(p.rsplit("/", 1)[1] for p in fs.ls(path, refresh=True))
    assert listed == sorted([s["name"] for s in result["shards"]] + ["manifest.json", "_parts"])
    # LastModified has a resolution of a second: a coarse check (the local tests compare mtime_ns)
    modified = {p: fs.info(p)["LastModified"] for p in fs.find(path)}
    again = convert("pascal_context", pascal_root, "train", url, SHARD_MB, part=1, num_parts=3, resume=True)
    assert again == result and {p: fs.info(p)["LastModified"] for p in fs.find(path)} == modified

    single = f"s3://{s3_bucket}/single/train"
    convert("pascal_context", pascal_root, "train", single, SHARD_MB, resume=True)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find(url_to_fs(single)[1]))
    assert "manifest.json" in names and not any("part-" in n for n in names)  # the journal folded into the manifest


def test_restart_clears_a_conversion_into_another_number_of_parts(pascal_root, pascal_shards, tmp_path):
    out = str(tmp_path / "train")
    convert("pascal_context", pascal_root, "train", out, SHARD_MB, part=1, num_parts=2)  # half of a 2-part run
    assert any("-p00001-of-00002-" in name for name in files(out))
    with pytest.raises(ConversionMismatchError, match=r"conversion into \[2\] part\(s\), not 1"):
        convert("pascal_context", pascal_root, "train", out, SHARD_MB, resume=True)
    convert("pascal_context", pascal_root, "train", out, SHARD_MB)  # resume=False: --restart
    assert files(out) == files(pascal_shards["train"])  # the 2-part shards and records are gone
