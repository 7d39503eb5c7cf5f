"""MFU's denominator: the nominal dense peak of the device torch names, per training dtype."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from peak_flops import nominal_peak  # noqa: E402


@pytest.mark.parametrize(
    ("name", "dtype", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),  # SXM5, as torch names it
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5),
        ("NVIDIA H100 NVL", torch.float16, 835.0),
        ("NVIDIA H200", torch.bfloat16, 989.4),
        ("NVIDIA H200 NVL", torch.bfloat16, 835.0),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
        ("NVIDIA A100 80GB PCIe", torch.float32, 19.5),
        ("NVIDIA H100 80GB HBM3", torch.float32, 66.9),
    ],
)
def test_nominal_peak_by_device_name_and_dtype(name, dtype, tflops):
    assert nominal_peak(name, dtype) == pytest.approx(tflops * 1e12)


def test_unknown_devices_and_dtypes_have_no_nominal_peak():
    assert nominal_peak("cpu", torch.bfloat16) is None
    assert nominal_peak("NVIDIA GeForce RTX 4090", torch.bfloat16) is None
    assert nominal_peak("NVIDIA H100 80GB HBM3", torch.float64) is None


def test_mfu_is_given_in_both_flop_conventions():
    """Model FLOPs (forward + the backward that runs) and 3 x forward, side by side: with a frozen
    backbone the backward is ~1.39x the forward (Swin-B 448), so the shortcut reads 3 / 2.39 higher."""
    from peak_flops import utilisation

    u = utilisation(forward_flops=1e12, step_flops=2.39e12, step_s=0.01, peak=989.4e12)
    assert u["backward_over_forward"] == pytest.approx(1.39)
    assert u["mfu"] == pytest.approx(2.39e14 / 989.4e12) and u["mfu_3x_forward"] / u["mfu"] == pytest.approx(3 / 2.39)
    assert utilisation(1.0, 3.0, 1.0, None) == {"backward_over_forward": 2.0, "mfu": None, "mfu_3x_forward": None}


def test_a_frozen_backbone_makes_the_backward_less_than_twice_the_forward():
    from gpu_throughput import forward_and_step_flops

    from mtlora_dist.config import load_config

    cfg = load_config("configs/quickstart.yaml", ["model.img_size=[64,64]", "model.backbone_kwargs.window_size=2"])
    forward, step = forward_and_step_flops(cfg, 1, 64, torch.device("cpu"), torch.float32, False)
    assert 1.0 < (step - forward) / forward < 2.0  # input gradients through the backbone, weights only in the rest
