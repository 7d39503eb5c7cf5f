"""The mixed-precision path, exercised on the CPU: DeepSpeed bf16 trains, checkpoints and resumes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _run(tmp_path: Path, *overrides: str, precision: str = "bf16") -> None:
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "model.img_size=[64,64]",
        "model.backbone_kwargs.window_size=2",
        "data.batch_size=4",
        "data.num_workers=0",
        "eval.every=0",
        "logging.log_every=1",
        "logging.progress_bar=false",
        f"deepspeed.precision={precision}",
        "max_steps=4",
        f"run_dir={tmp_path / 'run'}",
        f"data.synthetic.root={tmp_path / 'data'}",
        "data.synthetic.num_train=16",
        "data.synthetic.num_val=8",
        *overrides,
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_bf16_trains_checkpoints_and_resumes_on_cpu(tmp_path):
    _run(tmp_path, "steps_per_job=2")
    _run(tmp_path)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    assert sorted(train) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in train.values())
    val = [r for r in records if r["split"] == "val"]
    assert val and math.isfinite(val[-1]["tasks"]["normals"]["mean"])


def test_bf16_with_a_static_image_size_trains(tmp_path):
    """timm's precomputed fp32 shifted-window masks (dynamic_img_size=false) meet bf16 attention."""
    _run(tmp_path, "model.dynamic_img_size=false", "max_steps=2")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if r["split"] == "train")


def test_zero2_offload_config_trains_on_cpu(tmp_path):
    _run(tmp_path, "deepspeed=zero2_offload")  # optimizer state and step on the CPU, bf16 weights
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_auto_precision_trains_in_fp32_on_a_cpu_and_the_run_records_it(tmp_path):
    import yaml

    _run(tmp_path, "max_steps=1", precision="auto")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["deepspeed"]["precision"] == "fp32"  # eval and export rebuild the model in what trained
