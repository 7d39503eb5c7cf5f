"""The loop reference in bf16 (as the engine leaves the model: bf16 parameters, fp32 LoRA scales), and
the benchmark processes' DeepSpeed accelerator choice."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from mtlora_dist.config import load_config  # noqa: E402
from mtlora_dist.models import build_model  # noqa: E402

import common  # noqa: E402
from reference_mtlora import TOLERANCE, check_agreement, max_difference, ref_model  # noqa: E402


def test_reference_agrees_with_the_model_in_bf16_with_fp32_scales():
    cfg = load_config(None, ["model.img_size=[64,64]", "model.backbone_kwargs.window_size=2"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    common.randomize_lora(model)
    model = common.cast_like_engine(model, torch.bfloat16).eval()
    scales = {n: b.dtype for n, b in model.named_buffers() if "lora_" in n and "scale" in n}
    assert scales and set(scales.values()) == {torch.float32}  # the case that broke the reference
    images = torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ours, ref = model(images), ref_model(model, images)
    assert {o.dtype for o in ref.values()} == {torch.bfloat16}
    diff, scale = max_difference(ours, ref)
    assert 0 < diff <= TOLERANCE[torch.bfloat16] * scale  # bf16 rounding, nothing more
    assert check_agreement(ours, ref) == diff


def test_check_agreement_refuses_outputs_beyond_the_dtype_rounding():
    ref = {"semseg": torch.ones(2, 3, dtype=torch.bfloat16)}
    with pytest.raises(SystemExit, match="outputs differ"):
        check_agreement({"semseg": ref["semseg"] * 1.1}, ref)
    with pytest.raises(SystemExit, match="outputs differ"):
        check_agreement({"semseg": ref["semseg"] * float("nan")}, ref)


@pytest.mark.parametrize("cuda", [False, True])
def test_deepspeed_is_pinned_to_the_cpu_only_without_cuda(monkeypatch, cuda):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    env = common.subprocess_env(WANDB_MODE="disabled")
    assert env.get("DS_ACCELERATOR") == (None if cuda else "cpu") and env["WANDB_MODE"] == "disabled"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # an explicit choice is kept
    assert common.subprocess_env()["DS_ACCELERATOR"] == "cuda"


def test_run_all_takes_the_accelerator_choice_from_the_shared_helper():
    import run_all

    assert run_all.subprocess_env is common.subprocess_env
    assert '"DS_ACCELERATOR": "cpu"' not in (REPO / "benchmarks" / "run_all.py").read_text()
