"""The GPU benchmark's code path, run on the CPU with the tiny model: DeepSpeed set-up, FLOP counting
and the MFU arithmetic, so it works the day a GPU is there (bf16 itself: tests/engine/test_precision.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
pytestmark = pytest.mark.integration

from common import subprocess_env  # noqa: E402


@pytest.fixture(scope="module")
def throughput(tmp_path_factory):
    """``gpu_throughput.py`` on the tiny model with the given extra flags (each run once per module)."""
    runs: dict[tuple[str, ...], dict] = {}

    def run(*flags: str, **env: str) -> dict:
        if flags not in runs:
            out = tmp_path_factory.mktemp("throughput") / "result.json"
            cmd = [
                sys.executable,
                "benchmarks/gpu_throughput.py",
                "--config",
                "configs/quickstart.yaml",
                "--batch",
                "2",
                "--size",
                "64",
                "--steps",
                "1",
                "--precision",
                "fp32",
                *flags,
                "--json",
                str(out),
            ]
            proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
            runs[flags] = json.loads(out.read_text())
        return runs[flags]

    return run


def test_gpu_throughput_script_runs_on_cpu(throughput):
    result = throughput()
    assert result["precision"] == "fp32" and (result["device"] == "cpu") != torch.cuda.is_available()
    assert result["model_tflop_per_step"] > 0 and result["images_per_s"] > 0
    assert 0 < result["mfu_vs_matmul"] == pytest.approx(result["achieved_tflops"] / result["measured_matmul_tflops"])
    assert result["mfu"] is None and result["nominal_peak_tflops"] is None  # a CPU has no nominal peak in the table


def test_mfu_does_not_count_the_checkpointing_recompute(throughput):
    """Activation checkpointing repeats forward work in the backward: hardware FLOPs, not model FLOPs."""
    plain, checkpointed = throughput(), throughput("--grad-checkpointing")
    assert checkpointed["grad_checkpointing"] and not plain["grad_checkpointing"]
    assert checkpointed["model_tflop_per_step"] == plain["model_tflop_per_step"]
    assert checkpointed["hardware_tflop_per_step"] > 1.1 * plain["hardware_tflop_per_step"]
    assert checkpointed["hfu_vs_matmul"] > checkpointed["mfu_vs_matmul"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="breaks the CPU (C++) compiler; on a GPU compile uses Triton")
def test_compile_that_cannot_work_is_skipped_with_a_message_and_counts_the_same_flops(throughput):
    """torch.compile does work on this CPU, but takes ~7 minutes for the tiny model: here the C++ compiler
    is made unusable, which is how compile fails on a machine without one."""
    plain, compiled = throughput(), throughput("--compile", CXX="/bin/false")
    assert compiled["compile"] is False and "compiler" in compiled["compile_skipped"].lower()
    assert compiled["model_tflop_per_step"] == plain["model_tflop_per_step"]


def test_model_flops_are_linear_in_the_batch():
    """gpu_throughput counts a batch of one and multiplies (a whole un-checkpointed batch may not fit)."""
    from gpu_throughput import step_flops

    from mtlora_dist.config import load_config

    cfg = load_config("configs/quickstart.yaml", ["model.img_size=[64,64]", "model.backbone_kwargs.window_size=2"])
    one, two = (step_flops(cfg, batch, 64, torch.device("cpu"), torch.float32, False) for batch in (1, 2))
    assert one > 0 and two == 2 * one


def test_model_step_reference_agrees_with_the_model(tmp_path):
    """The benchmark refuses to time anything unless our model and its per-task-loop reference agree,
    so this keeps the reference honest as the model changes (tiny model, dropout on)."""
    out = tmp_path / "result.json"
    cmd = [
        sys.executable,
        "benchmarks/model_step.py",
        "--config",
        "configs/quickstart.yaml",
        "--size",
        "96",
        "--repeats",
        "1",
        "--json",
        str(out),
        "adapter.dropout=0.05",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["max_abs_diff_vs_reference"] < 1e-4
    assert result["gflop_per_step"]["ours"] > 0 and result["mtlora_step_s"] > 0
    assert result["adapter_flop_ratio_backbone"] > 1  # adapters add work on top of the frozen backbone
