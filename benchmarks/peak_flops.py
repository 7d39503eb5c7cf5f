"""Nominal dense peak FLOP/s of the accelerators the project runs on, by the name torch reports.

MFU is conventionally model FLOPs per second over the device's *nominal* dense peak in the training
dtype (PaLM's definition, also torchtitan's), not over a measured matmul rate: the best 8192^3 bf16
product on an H100/H200 reaches ~790 TFLOP/s of the nominal 989, so dividing by it overstates MFU
~1.25x. The measured rate stays in the results as a second reference. Figures are NVIDIA's data-sheet
numbers without sparsity; fp32 means plain fp32 (no TF32), as the benchmarks run it.

The FLOPs of a step, stated both ways (:func:`utilisation`): "model FLOPs" are the forward plus the
backward that actually runs, counted; the common shortcut takes 3 x the forward (a backward of 2x: input
and weight gradients). MTLoRA freezes the backbone, whose backward computes input gradients only, so its
backward is ~1.39x the forward for Swin-B at 448 px and the shortcut reads 3 / 2.39 = 1.26x higher.
"""

from __future__ import annotations

import torch

__all__ = ["NOMINAL_TFLOPS", "nominal_peak", "utilisation"]

# (name substrings that identify the part, in order of precedence) -> TFLOP/s by dtype
NOMINAL_TFLOPS: dict[tuple[str, ...], dict[torch.dtype, float]] = {
    ("H200 NVL",): {torch.bfloat16: 835.0, torch.float16: 835.0, torch.float32: 60.0},
    ("H200",): {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9},
    ("H100 NVL",): {torch.bfloat16: 835.0, torch.float16: 835.0, torch.float32: 60.0},
    ("H100 PCIe",): {torch.bfloat16: 756.5, torch.float16: 756.5, torch.float32: 51.2},
    ("H100",): {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9},  # SXM5 (HBM3)
    ("A100",): {torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 19.5},
}


def nominal_peak(device_name: str, dtype: torch.dtype) -> float | None:
    """Nominal dense FLOP/s of ``device_name`` in ``dtype``, or None for a device not in the table."""
    for names, peaks in NOMINAL_TFLOPS.items():
        if any(name.lower() in device_name.lower() for name in names):
            peak = peaks.get(dtype)
            return None if peak is None else peak * 1e12
    return None


def utilisation(forward_flops: float, step_flops: float, step_s: float, peak: float | None) -> dict:
    """MFU of a step under both FLOP conventions, side by side: ``mfu`` (model FLOPs: forward + the
    backward that runs) and ``mfu_3x_forward`` (3 x forward), with the backward's size in forwards."""
    return {
        "backward_over_forward": (step_flops - forward_flops) / forward_flops,
        "mfu": step_flops / step_s / peak if peak else None,
        "mfu_3x_forward": 3 * forward_flops / step_s / peak if peak else None,
    }
