"""The multi-task dense model: MTLoRA Swin backbone + one decoder per task, and its builder."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mtlora_dist.adapters.config import AdapterConfig
from mtlora_dist.models.config import ModelConfig, TrainableConfig
from mtlora_dist.models.decoders import TaskDecoder
from mtlora_dist.models.mtlora_swin import MTLoRASwin
from mtlora_dist.models.pretrained import load_pretrained_swin
from mtlora_dist.models.trainable import apply_trainable_policy
from mtlora_dist.tasks.registry import check_tasks, get_task

__all__ = ["ModelConfig", "MultiTaskSwin", "build_model"]


class MultiTaskSwin(nn.Module):
    """Images (B, 3, H, W) -> {task: logits (B, K_t, H, W)}."""

    def __init__(self, backbone: MTLoRASwin, decoders: dict[str, TaskDecoder]) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoders = nn.ModuleDict(decoders)
        self.tasks = backbone.tasks

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.backbone(images)  # per stage: (T, B, h, w, C)
        size = images.shape[-2:]
        outputs = {}
        for k, task in enumerate(self.tasks):
            logits = self.decoders[task]([f[k] for f in features])  # (B, K, H/8, W/8)
            outputs[task] = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return outputs

    @property
    def pruned_parameters(self) -> int:
        return self.backbone.pruned_parameters


def build_model(
    model: ModelConfig,
    adapter: AdapterConfig,
    trainable: TrainableConfig,
    tasks: Sequence[str],
    dataset: str,
) -> MultiTaskSwin:
    """Build the model, load pretrained weights if configured, and apply the trainable policy."""
    check_tasks(dataset, list(tasks))
    backbone = MTLoRASwin(
        model.backbone,
        tasks,
        adapter,
        img_size=model.img_size,
        pyramid=model.pyramid,
        drop_path_rate=model.drop_path_rate,
        dynamic_img_size=model.dynamic_img_size,
        grad_checkpointing=model.grad_checkpointing,
        **dict(model.backbone_kwargs),
    )
    if model.pretrained:
        load_pretrained_swin(backbone, model.pretrained)
    decoders = {
        t: TaskDecoder(
            backbone.feature_dims, model.decoder_channels, model.head_hidden_channels, get_task(t).outputs_for(dataset)
        )
        for t in tasks
    }
    net = MultiTaskSwin(backbone, decoders)
    apply_trainable_policy(net, trainable)
    return net
