"""The real ``slurm/convert_array.sh`` as a 2-task array job on the test cluster (tests/slurm/conftest.py).

Each array task converts its half of a small synthetic PASCAL-Context split with one worker; the task that
finishes last merges the two parts. Checked: both tasks complete, the merged manifest lists every sample
exactly once in split order, the shards verify and stream through the loader; a resubmission of the same
command finds both parts converted and rewrites nothing.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "convert_array.sh"
pytestmark = [pytest.mark.slurm, pytest.mark.integration]
JOB_TIMEOUT = 180
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def raw_pascal(tmp_path_factory) -> Path:
    from mtlora_dist.synthetic.datasets import generate

    root = tmp_path_factory.mktemp("convert-array") / "raw"
    generate("pascal_context", str(root), num_train=16, num_val=2, seed=1, size=64)
    return root


def submit(cluster, workdir: Path, name: str, args: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(cluster.env)
    env["MTLORA_PYTHON"] = sys.executable
    flags = ["--array=0-1", "--cpus-per-task=1", "--time=10", f"--job-name={name}", f"--output={workdir}/{name}-%a.out"]
    return cluster.sbatch([*flags, str(SCRIPT), *args], env=env, cwd=workdir)


def wait_for_tasks(cluster, job_id: int, workdir: Path, name: str, count: int = 2) -> list[dict[str, str]]:
    """``scontrol`` records of the array's tasks once every one has ended."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        infos = [cluster.job(f"{job_id}_{i}") for i in range(count)]
        if all(info.get("JobState") in ENDED for info in infos):
            return infos
        time.sleep(1)
    cluster.run(["scancel", str(job_id)], check=False)
    raise AssertionError(f"array job {job_id} did not end in {JOB_TIMEOUT} s\n{outputs(workdir, name)}")


def outputs(workdir: Path, name: str) -> str:
    return "\n".join(
        f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(workdir.glob(f"{name}-*.out"))
    )


def test_array_job_converts_parts_and_merges(slurm_cluster, raw_pascal, tmp_path):
    from mtlora_dist.data.ingest.formats import get_reader
    from mtlora_dist.data.shards.manifest import read_manifest, verify_shards

    from factories import make_loader

    out = tmp_path / "shards"
    args = [
        "pascal_context",
        "--root",
        str(raw_pascal),
        "--split",
        "train",
        "--out",
        str(out),
        "--shard-size-mb",
        "0.05",
    ]
    job = submit(slurm_cluster, tmp_path, "convert", args)
    infos = wait_for_tasks(slurm_cluster, job, tmp_path, "convert")
    text = outputs(tmp_path, "convert")
    assert all(i["JobState"] == "COMPLETED" and i["ExitCode"] == "0:0" for i in infos), f"{infos}\n{text}"
    assert text.count("| 1 worker(s)") == 2 and "16 samples in" in text, text  # the last task merged

    manifest = json.loads((out / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    assert {n.split("-of-")[0] for n in names} == {"train-p00000", "train-p00001"} and names == sorted(names)
    keys = []
    for name in names:
        with tarfile.open(out / name) as tar:
            keys += list(dict.fromkeys(m.split(".")[0] for m in tar.getnames()))
    ids = get_reader("pascal_context", str(raw_pascal)).ids("train")
    assert keys == ids and manifest["num_samples"] == len(ids) == 16  # every sample once, in split order
    assert verify_shards(read_manifest(str(out))) == []
    loader = make_loader(
        str(out), dataset="pascal_context", tasks=manifest["tasks"], split="val", img_size=(32, 32), batch_size=4
    )
    streamed = [k for b in loader for k, ok in zip(b["__key__"], b["valid"].tolist()) if ok]
    assert sorted(streamed) == sorted(ids)

    # the same submission again: both parts are converted, nothing is rewritten
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = submit(slurm_cluster, tmp_path, "again", args)
    infos = wait_for_tasks(slurm_cluster, again, tmp_path, "again")
    text = outputs(tmp_path, "again")
    assert all(i["JobState"] == "COMPLETED" for i in infos), f"{infos}\n{text}"
    assert text.count("is already converted: nothing rewritten") == 2, text
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
