"""Hand the model to DeepSpeed: only trainable parameters reach the optimizer, so ZeRO shards their
optimizer state and the frozen backbone never enters a checkpoint."""

from __future__ import annotations

import logging
from typing import Any

import torch
from packaging.version import Version
from torch import nn

from mtlora_dist.config import DeepSpeedSettings, OptimConfig
from mtlora_dist.data.config import BatchGeometry
from mtlora_dist.engine.optim import build_optimizer
from mtlora_dist.models.precision import align_buffers

__all__ = ["bucket_elements", "deepspeed_config", "initialize_engine", "model_dtype", "resolve_precision"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TESTED_DEEPSPEED = ("0.18", "0.20")  # [low, high): pyproject.toml pins the same range
log = logging.getLogger("mtlora_dist")

# Buckets (docs/gpu.md, "Buckets"): DeepSpeed's 5e8-element default suits billion-parameter models; ZeRO-1/2
# allocate buffers of the bucket size whatever the trainable set, and one bucket holding every gradient
# leaves nothing to overlap with the backward. A quarter of the set per bucket, within these bounds.
BUCKETS_PER_SET = 4
MIN_BUCKET = 2**20  # elements (4 MiB in fp32): below this, per-collective latency outweighs overlap
MAX_BUCKET = 500_000_000  # DeepSpeed's default


def check_deepspeed_version(version: str) -> bool:
    """Warn (once per engine) when DeepSpeed is outside the tested range; releases differ in how they
    cast buffers and in the checkpoint internals resume relies on."""
    low, high = (Version(v) for v in TESTED_DEEPSPEED)
    if low <= Version(version) < high:
        return True
    log.warning(
        "DeepSpeed %s is outside the tested range >=%s,<%s; reinstall with pip install "
        "'deepspeed>=%s,<%s' if training or resuming fails",
        version,
        *TESTED_DEEPSPEED,
        *TESTED_DEEPSPEED,
    )
    return False


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """``auto`` -> ``bf16`` on a CUDA device that supports it, else ``fp32``; other values unchanged."""
    if precision != "auto":
        return str(precision)
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def model_dtype(settings: DeepSpeedSettings) -> torch.dtype:
    return _DTYPES[resolve_precision(settings.precision)]


def bucket_elements(parameters: int, override: int = 0) -> int:
    """Elements per ZeRO bucket for ``parameters`` elements to reduce or gather: ``override`` when set,
    else ``parameters / BUCKETS_PER_SET`` rounded up to a multiple of 1024, within [MIN_BUCKET, MAX_BUCKET]."""
    if override:
        return override
    size = -(-parameters // BUCKETS_PER_SET)
    return min(max(-(-size // 1024) * 1024, MIN_BUCKET), MAX_BUCKET)


def deepspeed_config(
    settings: DeepSpeedSettings, geometry: BatchGeometry, trainable: int, parameters: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed JSON for our settings, buckets sized to ``trainable`` (ZeRO-3's parameter prefetch to
    ``parameters``, all of them: it gathers the frozen backbone too); ``settings.extra`` is merged on top."""
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.zero_stage >= 1:
        bucket = bucket_elements(trainable, settings.bucket_size)
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket, overlap_comm=settings.overlap_comm)
    if settings.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket_elements(parameters or trainable, settings.bucket_size)
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    precision = resolve_precision(settings.precision)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": geometry.micro_batch,
        "gradient_accumulation_steps": geometry.accumulation,
        "train_batch_size": geometry.global_batch,
        "gradient_clipping": settings.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # our optimizer is torch's AdamW over the trainable groups; allow it under ZeRO and offload
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16" and settings.fp32_grad_reduce:
        config.update(_fp32_gradients(settings.zero_stage))
    return _merge(config, dict(settings.extra))


def _fp32_gradients(zero_stage: int) -> dict[str, Any]:
    """Gradient reduction in fp32 on every stage; accumulation in fp32 where DeepSpeed 0.19's ZeRO
    optimizer keeps it (stages 2 and 3). Stage 1 would switch to DeepSpeed's BF16_Optimizer (another
    checkpoint layout) and stage 0 refuses the mix ("unsupported mix of model_dtype and grad_accum_dtype")."""
    config: dict[str, Any] = {"communication_data_type": "fp32"}
    if zero_stage >= 2:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = _merge(dict(base.get(key, {})), value) if isinstance(value, dict) else value
    return base


def initialize_engine(
    model: nn.Module,
    optim: OptimConfig,
    settings: DeepSpeedSettings,
    geometry: BatchGeometry,
    total_steps: int,
    steps_per_epoch: int = 0,
):
    """``deepspeed.initialize`` with AdamW over trainable parameter groups and a warmup-cosine schedule
    that DeepSpeed steps (and checkpoints) with the optimizer. ``geometry`` gives the micro-batch, the
    accumulation and the global batch (DeepSpeed's ``train_batch_size`` and the lr scaling) in one place.
    ``steps_per_epoch`` (optimizer steps) turns ``optim.warmup_epochs`` into steps; 0 means the whole run is one epoch."""
    import deepspeed

    check_deepspeed_version(deepspeed.__version__)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parameters = sum(p.numel() for p in model.parameters())
    config = deepspeed_config(settings, geometry, trainable, parameters)
    optimizer, scheduler = build_optimizer(
        model, optim, geometry.global_batch, total_steps, steps_per_epoch or total_steps
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    align_buffers(engine.module, model_dtype(settings))  # DeepSpeed releases differ in casting buffers
    return engine
