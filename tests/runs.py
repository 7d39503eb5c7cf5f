"""What the tests that run ``launch/`` scripts share: the tiny quickstart overrides and the launchers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from s3_server import free_port

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")

# The quickstart's tiny model at 64 px, small batches, no workers, a log line every step, no bar, and
# evaluation only at the end; a test adds its steps, data and what it is about.
TINY_RUN = [
    "model.img_size=[64,64]",
    "model.backbone_kwargs.window_size=2",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "data.num_workers=0",
    "logging.log_every=1",
    "logging.progress_bar=false",
    "eval.every=0",
]


def deepspeed_launcher(ranks: int = 2) -> list[str]:
    """What ``deepspeed --num_accelerators N`` runs, on a free port (CPU ranks on this machine)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(ranks),
            "--master_port", str(free_port())]  # fmt: skip


def torchrun_launcher(ranks: int = 2) -> list[str]:
    """What ``torchrun --nproc_per_node N`` runs, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_port", str(free_port())]  # fmt: skip


def run_script(
    script: str, args: list[str], cwd: Path, config: str = QUICKSTART, timeout: int = 420
) -> subprocess.CompletedProcess:
    """``python launch/<script> --config <config> <args>`` on the CPU with wandb offline; fails the test,
    with the output's tail, unless it exits 0."""
    cmd = [sys.executable, str(REPO / "launch" / script), "--config", str(config), *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def train_records(run_dir: Path, steps: int, tasks: list[str]) -> tuple[list[dict], dict]:
    """The train records of a finished run (checked: one per step, finite losses of exactly ``tasks``) and
    its last validation record."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split") == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for record in train:
        assert math.isfinite(record["loss"]) and set(record["losses"]) == set(tasks), record
        assert all(math.isfinite(v) for v in record["losses"].values()), record
    return train, [r for r in records if r.get("split") == "val"][-1]
