"""Small pieces the benchmark scripts share."""

from __future__ import annotations

import json
import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def emit(result: dict | list, path: str | None) -> None:
    """Print the figures as JSON and also write them to ``path`` when given."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)


def random_targets(tasks, batch: int, size: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Label tensors of the right kinds for the multi-task loss (values do not matter for timing)."""
    targets = {t: torch.zeros(batch, size, size, dtype=torch.uint8, device=device) for t in tasks}
    if "normals" in targets:
        targets["normals"] = torch.nn.functional.normalize(torch.randn(batch, 3, size, size, device=device), dim=1)
    return targets


def randomize_lora(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Non-zero LoRA weights (B starts at zero, which would hide every task stream's difference);
    drawn on the CPU so that every device gets the same values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and "scale" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def default_device() -> str:
    """Where a benchmark runs unless told: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued kernels, so a wall-clock interval covers the work it timed."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def exact_fp32() -> None:
    """fp32 means fp32: no TF32 matmuls or convolutions on a GPU (they would blur comparisons with fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a benchmark's child process. DeepSpeed is pinned to its CPU accelerator
    only where there is no CUDA device: on a GPU machine it must pick its CUDA accelerator itself."""
    env = {**os.environ, **extra}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def cast_like_engine(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters in ``dtype``, buffers as the training engine leaves them (LoRA scales fp32, BatchNorm
    statistics fp32, attention masks in ``dtype``), so a benchmark's model computes like the trained one."""
    from mtlora_dist.models.precision import align_buffers

    for p in model.parameters():
        p.data = p.data.to(dtype)
    return align_buffers(model, dtype)
