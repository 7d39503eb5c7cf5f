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
