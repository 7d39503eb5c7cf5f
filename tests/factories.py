"""Small models and helpers that many tests build: one definition each.

``tiny_model_config`` is a Swin with the real structure (4 stages, shifted windows, patch merging) at
16 channels and 64 px, fast on a CPU; ``randomize_lora`` gives the B matrices (zero at init) values,
so every low-rank branch contributes to outputs and gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from mtlora_dist.adapters import AdapterConfig
from mtlora_dist.models import ModelConfig, MultiTaskSwin, build_model
from mtlora_dist.models.trainable import TrainableConfig

PAPER_TASKS = ["semseg", "human_parts", "sal", "normals"]
TINY_BACKBONE = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4), "window_size": 2}


def tiny_model_config(img_size: int = 64, **overrides) -> ModelConfig:
    """A tiny Swin-based multi-task model; ``overrides`` are ModelConfig fields (``backbone_kwargs``
    entries given there replace the tiny defaults one by one)."""
    backbone = {**TINY_BACKBONE, **overrides.pop("backbone_kwargs", {})}
    fields = dict(
        img_size=[img_size, img_size],
        backbone_kwargs=backbone,
        decoder_channels=[4, 4, 8, 8],
        head_hidden_channels=16,
        drop_path_rate=0.0,
    )
    return ModelConfig(**{**fields, **overrides})


def tiny_model(
    adapter: AdapterConfig | None = None,
    tasks: list[str] | None = None,
    dataset: str = "pascal_context",
    config: ModelConfig | None = None,
    seed: int = 0,
) -> MultiTaskSwin:
    torch.manual_seed(seed)
    return build_model(
        config or tiny_model_config(),
        adapter or AdapterConfig(shared_rank=4, task_rank=2, dropout=0.0),
        TrainableConfig(),
        list(tasks or PAPER_TASKS),
        dataset,
    )


def randomize_lora(module: nn.Module, std: float = 0.05, seed: int = 0, batchnorm: bool = False) -> nn.Module:
    """Random LoRA A/B values (trainable scales untouched); with ``batchnorm``, also non-trivial
    BatchNorm running statistics, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name and "scale" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        if batchnorm:
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module


def task_lora_positional(task_input: bool, shared_in_tasks: bool, mask=None):
    """``task_lora_linear`` over positional tensors only, ``(x, w, bias, task_a, task_bt, task_scale,
    *shared)`` with ``shared`` empty for no shared branch: the form gradcheck and autocast comparisons take."""
    from mtlora_dist.adapters.fused import task_lora_linear

    def run(x, w, bias, task_a, task_bt, task_scale, *shared):
        return task_lora_linear(x, w, bias, tuple(shared) or None, task_a, task_bt, task_scale,
                                task_input=task_input, shared_in_tasks=shared_in_tasks, mask=mask)  # fmt: skip

    return run


# build_loader's inputs by name: which object or section of the data config each test keyword fills
_LOADER_KEYS = {
    "order": {"shuffle_buffer", "sample_log"},
    "read": {"verify_checksums", "cache_dir", "cache_max_gb", "on_error", "max_consecutive_failures",
             "prefetch_samples", "buffer_mb", "concurrency"},
    "decode": {"jpeg", "png", "resampler", "normals_resampling", "reduced_decode", "augment_device"},
    "data": {"dataset", "tasks", "storage", "eval_protocol", "prefetch_batches"},
    "world": {"rank", "world_size", "num_workers", "device"},
    "geometry": {"batch_size", "accumulation"},
    "call": {"img_size", "seed", "shuffle", "augment"},
}  # fmt: skip


def make_loader(url: str, split: str = "train", **kw):
    """``build_loader`` for a test: keywords name the setting (``batch_size``, ``num_workers``,
    ``on_error``, ``sample_log``, ...) and land in the data config's section, the DataWorld or the
    BatchGeometry they belong to (``_LOADER_KEYS``); ``num_workers=None`` is sized by the CPU budget.
    ``batch_size`` is the micro-batch of a training loader and ``data.eval_batch_size`` of a val loader."""
    from mtlora_dist.cpus import cpu_budget
    from mtlora_dist.data.config import (
        BatchGeometry,
        DataConfig,
        DataWorld,
        DecodeConfig,
        OrderConfig,
        ReadConfig,
    )  # fmt: skip
    from mtlora_dist.data.stream.loader import build_loader

    where = {key: group for group, keys in _LOADER_KEYS.items() for key in keys}
    unknown = sorted(set(kw) - set(where))
    if unknown:
        raise TypeError(f"make_loader: unknown keyword(s) {unknown}")
    parts: dict[str, dict] = {group: {} for group in _LOADER_KEYS}
    for key, value in kw.items():
        parts[where[key]][key] = value
    batch = parts["geometry"].get("batch_size", 2)
    data = DataConfig(
        **parts["data"],
        batch_size=batch,
        eval_batch_size=batch,
        order=OrderConfig(**parts["order"]),
        read=ReadConfig(**parts["read"]),
        decode=DecodeConfig(**parts["decode"]),
    )
    world_kw = {"num_workers": 0, **parts["world"]}
    if world_kw["num_workers"] is None:
        world_kw["num_workers"] = cpu_budget(None).workers
    world = DataWorld(**world_kw)
    geometry = BatchGeometry(batch, parts["geometry"].get("accumulation", 1), world.world_size)
    call = {"img_size": (48, 64), **parts["call"]}
    return build_loader(url, split, data, world, geometry, **call)
