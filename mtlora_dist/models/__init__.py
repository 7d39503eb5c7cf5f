from mtlora_dist.models.multitask import ModelConfig, MultiTaskSwin, build_model
from mtlora_dist.models.mtlora_swin import MTLoRASwin

__all__ = ["ModelConfig", "MultiTaskSwin", "MTLoRASwin", "build_model"]
