"""Checkpointing with real DeepSpeed ranks (gloo on the CPU): resume equivalence, a save killed with
SIGKILL, S3 and local run directories, ZeRO-1 and ZeRO-2, and resuming on fewer ranks.

The runs are grouped so that the whole file costs six short launches of ``ckpt_worker.py``: one
uninterrupted ZeRO-2 reference that the other ZeRO-2 runs are compared with, a killed and a resumed S3
run (through the ``deepspeed`` launcher), a one-rank resume, and a ZeRO-1 reference plus its resume.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtlora_dist.engine.checkpoint import Checkpointer
from mtlora_dist.storage.fs import StorageOptions, url_to_fs

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ckpt_worker.py")
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()  # the launcher or run_ranks sets these per rank
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    return env


def run_ranks(nranks: int, args: list[str], log: Path, *, launcher: str = "env", expect_ok: bool = True) -> int:
    """Run the worker on ``nranks`` ranks, with the ``deepspeed`` launcher or plain RANK/WORLD_SIZE variables."""
    env, port = worker_env(), free_port()
    with open(log, "wb") as out:
        if launcher == "deepspeed":
            cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_accelerators", str(nranks),
                   "--master_port", str(port), str(WORKER), *args]
            procs = [subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)]
        else:
            procs = []
            for rank in range(nranks):
                rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nranks),
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=rank_env, stdout=out,
                                              stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    code = next((c for c in codes if c != 0), 0)
    if expect_ok and code != 0:
        tail = log.read_text(errors="replace")[-6000:]
        pytest.fail(f"worker failed with exit code {code}; log {log}:\n{tail}")
    return code


def losses(report: dict, steps: range) -> list[list[float]]:
    """Per rank, the losses of ``steps`` (JSON turned the step keys into strings)."""
    return [[per_rank[str(s)] for s in steps] for per_rank in report["losses"]]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), f"{key} differs"
        else:
            assert a[key] == b[key], f"{key}: {a[key]} != {b[key]}"


def tags(run_dir: str) -> list[str]:
    fs, path = url_to_fs(f"{run_dir}/checkpoints", StorageOptions())
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if "/step_" in p)


@pytest.fixture(scope="module")
def zero2_reference(tmp_path_factory):
    """Uninterrupted 2-rank ZeRO-2 run, 8 steps, saving every 2 to a local folder (keeps the last 3)."""
    base = tmp_path_factory.mktemp("zero2_ref")
    run_dir, report, dump = base / "run", base / "report.json", base / "end.pt"
    run_ranks(2, ["--run-dir", str(run_dir), "--steps", "8", "--save-every", "2", "--report", str(report),
                  "--dump-at-end", str(dump)], base / "log.txt")
    return {"run_dir": run_dir, "report": json.loads(report.read_text()),
            "state": torch.load(dump, weights_only=False)}


def test_reference_run_layout_and_retention(zero2_reference):
    assert zero2_reference["report"]["start"] == 0
    assert tags(str(zero2_reference["run_dir"])) == ["step_00000004", "step_00000006", "step_00000008"]
    marker = json.loads((zero2_reference["run_dir"] / "checkpoints" / "step_00000008" / "COMPLETE.json").read_text())
    assert marker["world_size"] == 2 and marker["zero_stage"] == 2 and marker["step"] == 8
    assert sorted(marker["files"]) == ["client_state/rank_00000.pt", "client_state/rank_00001.pt",
                                       "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                       "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_s3_save_killed_before_marker_resumes_from_previous(zero2_reference, s3_bucket, tmp_path):
    run_dir = f"s3://{s3_bucket}/runs/killed"
    common = ["--run-dir", run_dir, "--steps", "8", "--save-every", "2"]
    code = run_ranks(2, [*common, "--kill-at-step", "6", "--report", str(tmp_path / "killed.json")],
                     tmp_path / "killed.log", launcher="deepspeed", expect_ok=False)
    assert code != 0, "the run was meant to die inside its step-6 save"

    ckpt = Checkpointer(run_dir)
    assert ckpt.latest() == "step_00000004"  # step 6 is uploaded but has no marker
    fs, root = url_to_fs(f"{run_dir}/checkpoints", StorageOptions())
    partial = {p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/step_00000006")}
    assert "mp_rank_00_model_states.pt" in partial and "COMPLETE.json" not in partial
    assert fs.cat_file(f"{root}/latest") == b"step_00000004"

    report_path, dump = tmp_path / "resumed.json", tmp_path / "resumed_end.pt"
    run_ranks(2, [*common, "--report", str(report_path), "--dump-at-end", str(dump)], tmp_path / "resumed.log",
              launcher="deepspeed")
    report = json.loads(report_path.read_text())
    assert report["start"] == 4
    assert losses(report, range(5, 9)) == losses(zero2_reference["report"], range(5, 9))
    assert_same_state(torch.load(dump, weights_only=False), zero2_reference["state"])
    assert Checkpointer(run_dir).latest() == "step_00000008"
    assert tags(run_dir) == ["step_00000004", "step_00000006", "step_00000008"]  # step 2 retired


def test_zero2_resume_on_other_rank_counts_restores_weights_and_optimizer(zero2_reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(zero2_reference["run_dir"], run_dir)
    report_path, after_load, at_end = tmp_path / "report.json", tmp_path / "after_load.pt", tmp_path / "end.pt"
    run_ranks(1, ["--run-dir", str(run_dir), "--steps", "10", "--save-every", "2", "--report", str(report_path),
                  "--dump-after-load", str(after_load), "--dump-at-end", str(at_end)], tmp_path / "log.txt")
    report = json.loads(report_path.read_text())
    assert report["start"] == 8 and report["loaded_world_size"] == 2 and report["world_size"] == 1
    # 2 -> 1: fp32 masters, module weights, both Adam moments, Adam's step, lr, scheduler and global step
    assert_same_state(torch.load(after_load, weights_only=False), zero2_reference["state"])
    assert set(report["losses"][0]) == {"9", "10"}  # and it trains on
    marker = json.loads((run_dir / "checkpoints" / "step_00000010" / "COMPLETE.json").read_text())
    assert marker["world_size"] == 1

    # 1 -> 2: the one-rank checkpoint of step 10 split again over two ranks (with ZeRO's alignment padding)
    report_path, after_load2 = tmp_path / "report2.json", tmp_path / "after_load2.pt"
    run_ranks(2, ["--run-dir", str(run_dir), "--steps", "10", "--report", str(report_path),
                  "--dump-after-load", str(after_load2)], tmp_path / "log2.txt")
    report = json.loads(report_path.read_text())
    assert report["start"] == 10 and report["loaded_world_size"] == 1
    assert_same_state(torch.load(after_load2, weights_only=False), torch.load(at_end, weights_only=False))


def test_zero1_local_resume_reproduces_losses_and_reshards(tmp_path):
    ref_dir, report_path, dump = tmp_path / "ref", tmp_path / "ref.json", tmp_path / "ref_end.pt"
    common = ["--stage", "1", "--steps", "4", "--save-every", "2", "--keep-last", "0"]
    run_ranks(2, [*common, "--run-dir", str(ref_dir), "--report", str(report_path), "--dump-at-end", str(dump)],
              tmp_path / "ref.log")
    reference = json.loads(report_path.read_text())

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(ref_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000004")  # as if the run had died after step 2's save
    report_path, dump2 = tmp_path / "resumed.json", tmp_path / "resumed_end.pt"
    run_ranks(2, [*common, "--run-dir", str(resumed_dir), "--report", str(report_path), "--dump-at-end", str(dump2)],
              tmp_path / "resumed.log")
    report = json.loads(report_path.read_text())
    assert report["start"] == 2
    assert losses(report, range(3, 5)) == losses(reference, range(3, 5))
    assert_same_state(torch.load(dump2, weights_only=False), torch.load(dump, weights_only=False))

    # ZeRO-1 shards re-split for one rank: the same state as the 2-rank run's at step 4
    report_path, after_load = tmp_path / "one_rank.json", tmp_path / "one_rank_after_load.pt"
    run_ranks(1, [*common, "--run-dir", str(ref_dir), "--report", str(report_path), "--dump-after-load",
                  str(after_load)], tmp_path / "one_rank.log")
    assert json.loads(report_path.read_text())["start"] == 4
    assert_same_state(torch.load(after_load, weights_only=False), torch.load(dump, weights_only=False))
