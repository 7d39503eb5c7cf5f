"""What a checkpoint must match to be loaded into a run: the same backbone, tasks, dataset and adapter
mode (the Checkpointer adds every trainable parameter's name and shape). Shared by the trainer, which
writes it into each checkpoint's marker, and by evaluation and export, which check it."""

from __future__ import annotations

from mtlora_dist.config import TrainConfig

__all__ = ["run_fingerprint"]


def run_fingerprint(cfg: TrainConfig) -> dict:
    return {
        "backbone": cfg.model.backbone,
        "backbone_kwargs": {
            k: list(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.model.backbone_kwargs.items()
        },
        "dataset": cfg.data.dataset,
        "tasks": list(cfg.data.tasks),
        "adapter_mode": cfg.adapter.mode,
    }
