"""Helpers of the evaluation, export and report tests: the tiny training recipe and how scripts are run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from runs import TINY_RUN

from mtlora_dist.storage.fs import url_to_fs

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "quickstart.yaml")
TINY = [*TINY_RUN, "eval.visual_samples=2", "deepspeed.zero_stage=2", "optim.warmup_fraction=0.2", "max_steps=6"]


def run_script(
    script: str, args: list[str], cwd: Path, ranks: int = 0, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``launch/<script>`` under plain python (``ranks=0``) or the deepspeed launcher with ``ranks`` CPU ranks."""
    from s3_server import free_port

    path = str(REPO / "launch" / script)
    cmd = (
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_accelerators",
            str(ranks),
            "--master_port",
            str(free_port()),
            path,
        ]
        if ranks
        else [sys.executable, path]
    ) + args
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def read_jsonl(url: str) -> list[dict]:
    fs, path = url_to_fs(url)
    with fs.open(path, "r") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@dataclass(frozen=True)
class TrainedRun:
    run_dir: str
    overrides: list[str]  # what the run was trained with (on top of CONFIG)
    workdir: Path
