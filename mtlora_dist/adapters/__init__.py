from mtlora_dist.adapters.inject import AdapterConfig, inject_adapters, mtlora_layers
from mtlora_dist.adapters.mtlora_linear import MTLoRALinear

__all__ = ["AdapterConfig", "MTLoRALinear", "inject_adapters", "mtlora_layers"]
