"""MTLoRA adapters. :class:`AdapterConfig` is imported eagerly (torch-free, used to validate a run's
config before torch loads); the layers and the injection import torch on first use (PEP 562)."""

from mtlora_dist.adapters.config import SHARED_MODES, AdapterConfig
from mtlora_dist.lazy import lazy_exports

__all__ = ["AdapterConfig", "MTLoRALinear", "SHARED_MODES", "inject_adapters", "mtlora_layers"]

__getattr__ = lazy_exports(__name__, mtlora_linear=["MTLoRALinear"], inject=["inject_adapters", "mtlora_layers"])
