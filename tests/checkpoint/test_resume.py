"""Checkpointing with real DeepSpeed ranks (gloo on the CPU): same-world resume equivalence, elastic
resume 2 -> 1 -> 2 at ZeRO 0, 1, 2 and 3, saves killed before the marker and during the background upload
to S3, and a run log that holds every step exactly once after a kill and a resume.

Each ZeRO stage has one uninterrupted 2-rank reference run (8 steps, a checkpoint every 2) that the
other runs are compared with, bit for bit (weights, fp32 masters, Adam moments and step, lr, scheduler).
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

from mtlora_dist.checkpoint import CheckpointStore
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
    env = {
        k: v
        for k, v in os.environ.items()  # the launcher or run_ranks sets these per rank
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return env


def run_ranks(nranks: int, args: list[str], log: Path, *, launcher: str = "env", expect_ok: bool = True) -> int:
    """Run the worker on ``nranks`` ranks, with the ``deepspeed`` launcher or plain RANK/WORLD_SIZE variables."""
    env, port = worker_env(), free_port()
    with open(log, "wb") as out:
        if launcher == "deepspeed":
            cmd = [
                str(Path(sys.executable).with_name("deepspeed")),
                "--num_accelerators",
                str(nranks),
                "--master_port",
                str(port),
                str(WORKER),
                *args,
            ]
            procs = [subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)]
        else:
            procs = []
            for rank in range(nranks):
                rank_env = dict(
                    env,
                    RANK=str(rank),
                    LOCAL_RANK=str(rank),
                    WORLD_SIZE=str(nranks),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                )
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), *args], env=rank_env, stdout=out, stderr=subprocess.STDOUT
                    )
                )
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


def logged_steps(run_dir: str) -> list[int]:
    fs, path = url_to_fs(f"{run_dir}/metrics.jsonl", StorageOptions())
    fs.invalidate_cache()
    return [json.loads(line)["step"] for line in fs.cat_file(path).decode().splitlines()]


def newest(run_dir: str) -> str | None:
    found = CheckpointStore(f"{run_dir}/checkpoints").newest_complete()
    return found[0] if found else None


def reference_run(base: Path, stage: int) -> dict:
    run_dir, report, dump = base / "run", base / "report.json", base / "end.pt"
    run_ranks(
        2,
        [
            "--stage",
            str(stage),
            "--run-dir",
            str(run_dir),
            "--steps",
            "8",
            "--save-every",
            "2",
            "--report",
            str(report),
            "--dump-at-end",
            str(dump),
        ],
        base / "log.txt",
    )
    return {
        "run_dir": run_dir,
        "report": json.loads(report.read_text()),
        "state": torch.load(dump, weights_only=False),
        "stage": stage,
    }


@pytest.fixture(scope="module", params=[0, 1, 2, 3], ids=["zero0", "zero1", "zero2", "zero3"])
def reference(request, tmp_path_factory):
    """Uninterrupted 2-rank run of one ZeRO stage, 8 steps, saving every 2 locally (keeps the last 3)."""
    return reference_run(tmp_path_factory.mktemp(f"zero{request.param}_ref"), request.param)


@pytest.fixture(scope="module")
def zero2_reference(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("zero2_ref_s3"), 2)


def test_reference_layout_retention_and_log(reference):
    run_dir = reference["run_dir"]
    assert reference["report"]["start"] == 0
    assert tags(str(run_dir)) == ["step_00000004", "step_00000006", "step_00000008"]
    marker = json.loads((run_dir / "checkpoints" / "step_00000008" / "COMPLETE.json").read_text())
    assert marker["world_size"] == 2 and marker["zero_stage"] == reference["stage"] and marker["step"] == 8
    assert sorted(marker["files"]) == ["client.safetensors", "state.json", "trainable.safetensors"]
    files = {p.name for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    assert not {f for f in files if f.endswith((".pt", ".py", ".pkl"))}, files  # no pickles, no zero_to_fp32.py
    assert logged_steps(str(run_dir)) == list(range(1, 9))


def test_elastic_resume_two_to_one_to_two_ranks(reference, tmp_path):
    """A 2-rank checkpoint loads on 1 rank and back on 2, at every ZeRO stage, with equal state."""
    run_dir, stage = tmp_path / "run", ["--stage", str(reference["stage"])]
    shutil.copytree(reference["run_dir"], run_dir)
    report_path, after_load, at_end = tmp_path / "report.json", tmp_path / "after_load.pt", tmp_path / "end.pt"
    run_ranks(
        1,
        [
            *stage,
            "--run-dir",
            str(run_dir),
            "--steps",
            "10",
            "--save-every",
            "2",
            "--report",
            str(report_path),
            "--dump-after-load",
            str(after_load),
            "--dump-at-end",
            str(at_end),
        ],
        tmp_path / "log.txt",
    )
    report = json.loads(report_path.read_text())
    assert report["start"] == 8 and report["loaded_world_size"] == 2 and report["world_size"] == 1
    # 2 -> 1: fp32 masters, module weights, both Adam moments, Adam's step, lr, scheduler and global step
    assert_same_state(torch.load(after_load, weights_only=False), reference["state"])
    assert set(report["losses"][0]) == {"9", "10"}  # and it trains on

    # 1 -> 2: the one-rank checkpoint of step 10 split again over two ranks
    report_path, after_load2 = tmp_path / "report2.json", tmp_path / "after_load2.pt"
    run_ranks(
        2,
        [
            *stage,
            "--run-dir",
            str(run_dir),
            "--steps",
            "10",
            "--report",
            str(report_path),
            "--dump-after-load",
            str(after_load2),
        ],
        tmp_path / "log2.txt",
    )
    report = json.loads(report_path.read_text())
    assert report["start"] == 10 and report["loaded_world_size"] == 1
    assert_same_state(torch.load(after_load2, weights_only=False), torch.load(at_end, weights_only=False))


def test_same_world_resume_reproduces_losses_and_the_log(reference, tmp_path):
    """A run that died after step 8 but whose last complete checkpoint is step 4: the resumed run gives the
    reference's per-step losses and state, and metrics.jsonl holds every step once (cut back to 4)."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(reference["run_dir"], run_dir)
    for tag in ("step_00000006", "step_00000008"):
        shutil.rmtree(run_dir / "checkpoints" / tag)
    assert logged_steps(str(run_dir)) == list(range(1, 9))  # the log is ahead of the checkpoint
    report_path, dump = tmp_path / "resumed.json", tmp_path / "resumed_end.pt"
    run_ranks(
        2,
        [
            "--stage",
            str(reference["stage"]),
            "--steps",
            "8",
            "--save-every",
            "2",
            "--run-dir",
            str(run_dir),
            "--report",
            str(report_path),
            "--dump-at-end",
            str(dump),
        ],
        tmp_path / "resumed.log",
    )
    report = json.loads(report_path.read_text())
    assert report["start"] == 4
    assert losses(report, range(5, 9)) == losses(reference["report"], range(5, 9))
    assert_same_state(torch.load(dump, weights_only=False), reference["state"])
    assert logged_steps(str(run_dir)) == list(range(1, 9))


def test_s3_save_killed_before_marker_resumes_from_previous(zero2_reference, s3_bucket, tmp_path):
    run_dir = f"s3://{s3_bucket}/runs/killed"
    common = ["--run-dir", run_dir, "--steps", "8", "--save-every", "2"]
    code = run_ranks(
        2,
        [*common, "--kill-at-step", "6", "--report", str(tmp_path / "killed.json")],
        tmp_path / "killed.log",
        launcher="deepspeed",
        expect_ok=False,
    )
    assert code != 0, "the run was meant to die inside its step-6 save"

    assert newest(run_dir) == "step_00000004"  # step 6 is uploaded but has no marker
    fs, root = url_to_fs(f"{run_dir}/checkpoints", StorageOptions())
    partial = {p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/step_00000006")}
    assert "trainable.safetensors" in partial and "COMPLETE.json" not in partial
    assert fs.cat_file(f"{root}/latest").strip() == b"step_00000004"

    report_path, dump = tmp_path / "resumed.json", tmp_path / "resumed_end.pt"
    run_ranks(
        2,
        [*common, "--report", str(report_path), "--dump-at-end", str(dump)],
        tmp_path / "resumed.log",
        launcher="deepspeed",
    )
    report = json.loads(report_path.read_text())
    assert report["start"] == 4
    assert losses(report, range(5, 9)) == losses(zero2_reference["report"], range(5, 9))
    assert_same_state(torch.load(dump, weights_only=False), zero2_reference["state"])
    assert newest(run_dir) == "step_00000008"
    assert tags(run_dir) == ["step_00000004", "step_00000006", "step_00000008"]  # step 2 retired
    assert logged_steps(run_dir) == list(range(1, 9))  # the remote log: every step, once


def test_s3_killed_during_background_upload_keeps_the_previous_checkpoint(s3_bucket, tmp_path):
    run_dir = f"s3://{s3_bucket}/runs/upload-killed"
    code = run_ranks(
        2,
        [
            "--run-dir",
            run_dir,
            "--steps",
            "8",
            "--save-every",
            "2",
            "--kill-at-step",
            "6",
            "--kill-when",
            "upload",
            "--report",
            str(tmp_path / "killed.json"),
        ],
        tmp_path / "killed.log",
        expect_ok=False,
    )
    assert code != 0, "the run was meant to die inside its step-6 upload"
    fs, root = url_to_fs(f"{run_dir}/checkpoints", StorageOptions())
    fs.invalidate_cache()
    uploaded = {p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/step_00000006")}
    assert len(uploaded) == 1 and "COMPLETE.json" not in uploaded  # one object landed, then the kill
    assert newest(run_dir) == "step_00000004"


# ------------------------------------------------------------------ the data order through launch/train.py

EPOCH = 48  # training samples: 6 global batches of 8


@pytest.fixture(scope="module")
def order_shards(tmp_path_factory) -> dict[str, str]:
    """Synthetic PASCAL-Context shards of 48 training samples, several per shard."""
    from mtlora_dist.data.ingest.convert import convert
    from mtlora_dist.synthetic.datasets import generate

    root = tmp_path_factory.mktemp("order_data")
    generate("pascal_context", str(root / "src"), num_train=EPOCH, num_val=4, seed=5, size=48)
    return {s: str(convert("pascal_context", str(root / "src"), s, str(root / s), shard_size_mb=0.1) and root / s)
            for s in ("train", "val")}  # fmt: skip


def train_job(ranks: int, run_dir: Path, log_dir: Path, shards: dict, overrides: list[str], cwd: Path) -> None:
    """``launch/train.py`` on the quickstart's tiny model: 2 ranks through the ``deepspeed`` launcher, 1 rank
    as a plain process; every training batch's sample keys go to ``log_dir``."""
    from runs import TINY_RUN, deepspeed_launcher

    launcher = deepspeed_launcher(ranks) if ranks > 1 else [sys.executable]
    cmd = [*launcher, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
           *TINY_RUN, "model.img_size=[32,32]", f"data.train_url={shards['train']}", f"data.val_url={shards['val']}",
           "max_steps=6", "checkpoint.every=100", "eval.every=0", f"run_dir={run_dir}",
           f"data.order.sample_log={log_dir}", *overrides]  # fmt: skip
    env = {**worker_env(), "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def global_batches(log_dir: Path, ranks: int, accumulation: int) -> list[list[str]]:
    """The keys of each optimizer step from the ranks' sample logs: rank 0's A micro-batches, then rank 1's..."""
    per_rank = []
    for rank in range(ranks):
        lines = (log_dir / f"rank{rank}.jsonl").read_text().splitlines()
        per_rank.append({json.loads(x)["batch"]: json.loads(x)["keys"] for x in lines})
        assert [json.loads(x)["epoch"] for x in lines] == [0] * len(lines)
    first = min(per_rank[0]) // accumulation
    steps = len(per_rank[0]) // accumulation
    return [
        [k for r in range(ranks) for a in range(accumulation) for k in per_rank[r][s * accumulation + a]]
        for s in range(first, first + steps)
    ]


def test_elastic_mid_epoch_resume_two_to_one_to_two_ranks_keeps_the_order(order_shards, tmp_path):
    """A global batch of 8 trained in three jobs: 2 ranks x 2 workers (steps 1-2), 1 rank with gradient
    accumulation 2 and 1 worker (steps 3-4), 2 ranks without workers (steps 5-6): every sample of the epoch
    exactly once, in the order of an uninterrupted 2-rank run."""
    straight_logs = tmp_path / "straight_keys"
    train_job(2, tmp_path / "straight", straight_logs, order_shards, [], tmp_path)
    straight = global_batches(straight_logs, 2, 1)
    assert len(straight) == 6 and sorted(k for b in straight for k in b) == sorted({k for b in straight for k in b})
    assert len({k for b in straight for k in b}) == EPOCH

    run_dir = tmp_path / "elastic"
    jobs = [(2, ["data.num_workers=2", "steps_per_job=2"], 1),
            (1, ["data.num_workers=1", "steps_per_job=2", "deepspeed.gradient_accumulation_steps=2"], 2),
            (2, ["data.num_workers=0"], 1)]  # fmt: skip
    resumed = []
    for i, (ranks, overrides, accumulation) in enumerate(jobs):
        train_job(ranks, run_dir, tmp_path / f"keys{i}", order_shards, overrides, tmp_path)
        steps = global_batches(tmp_path / f"keys{i}", ranks, accumulation)
        assert len(steps) == 2, f"job {i} trained {len(steps)} steps"
        resumed += steps
    assert resumed == straight
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "train"] == list(range(1, 7))
