"""MTLoRA adapter settings, torch-free so a run's configuration can be checked before torch is imported."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtlora_dist.choices import StrEnum

__all__ = ["AdapterConfig", "AdapterMode", "SHARED_MODES"]


class AdapterMode(StrEnum):
    """How the task-agnostic low-rank update is combined with the frozen weight (see MTLoRALinear)."""

    matrix = "matrix"
    matrixv2 = "matrixv2"
    addition = "addition"
    add = "addition"  # the official code's name
    lora_only = "lora_only"


SHARED_MODES = tuple(mode.value for mode in AdapterMode)


@dataclass
class AdapterConfig:
    """MTLoRA settings; the defaults are the paper's per-task configs (spec Part A 1).

    Ranks and scales take a number, a list with one entry per stage, or (for tasks) a mapping from
    task name to either. ``task_scale: null`` means "same as the shared scale", as in the official code.
    """

    mode: AdapterMode = AdapterMode.matrix
    shared_rank: Any = 64
    task_rank: Any = 4
    shared_scale: Any = 4.0
    task_scale: Any = None
    dropout: float = 0.05
    trainable_scale_shared: bool = False
    trainable_scale_per_task: bool = False
    ta_targets: list[str] = field(
        default_factory=lambda: [
            "layers.*.blocks.*.attn.qkv",
            "layers.*.blocks.*.attn.proj",
            "layers.*.blocks.*.mlp.fc1",
            "layers.*.blocks.*.mlp.fc2",
        ]
    )
    ts_targets: list[str] = field(
        default_factory=lambda: [
            "layers.*.blocks.last.attn.proj",
            "layers.*.blocks.last.mlp.fc1",
            "layers.*.blocks.last.mlp.fc2",
        ]
    )
