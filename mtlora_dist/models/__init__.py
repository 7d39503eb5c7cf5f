"""The multi-task model. The config dataclasses are imported eagerly (torch-free, used to validate a
run's config before torch loads); the modules import torch on first use (PEP 562)."""

from mtlora_dist.lazy import lazy_exports
from mtlora_dist.models.config import ModelConfig, TrainableConfig

__all__ = ["ModelConfig", "MultiTaskSwin", "MTLoRASwin", "TrainableConfig", "build_model"]

__getattr__ = lazy_exports(__name__, multitask=["MultiTaskSwin", "build_model"], mtlora_swin=["MTLoRASwin"])
