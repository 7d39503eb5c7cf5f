"""The GPU benchmark's code path, run on the CPU with the tiny model: DeepSpeed set-up, FLOP counting
and the MFU arithmetic, so it works the day a GPU is there (bf16 itself: tests/engine/test_precision.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_gpu_throughput_script_runs_on_cpu(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "benchmarks/gpu_throughput.py", "--config", "configs/quickstart.yaml", "--batch", "2",
           "--size", "64", "--steps", "1", "--precision", "fp32", "--json", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["precision"] == "fp32"
    assert result["model_tflop_per_step"] > 0 and result["images_per_s"] > 0
    assert 0 < result["mfu"] == pytest.approx(result["achieved_tflops"] / result["measured_matmul_tflops"])


def test_model_step_reference_agrees_with_the_model(tmp_path):
    """The benchmark refuses to time anything unless our model and its per-task-loop reference agree,
    so this keeps the reference honest as the model changes (tiny model, dropout on)."""
    out = tmp_path / "result.json"
    cmd = [sys.executable, "benchmarks/model_step.py", "--config", "configs/quickstart.yaml", "--size", "96",
           "--repeats", "1", "--json", str(out), "adapter.dropout=0.05"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["max_abs_diff_vs_reference"] < 1e-4
    assert result["gflop_per_step"]["ours"] > 0 and result["mtlora_step_s"] > 0
    assert result["adapter_flop_ratio_backbone"] > 1  # adapters add work on top of the frozen backbone
