"""Model and trainable-parameter settings, torch-free so a run's configuration can be checked before
torch is imported. :func:`mtlora_dist.models.build_model` consumes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtlora_dist.choices import StrEnum

__all__ = ["CompileMode", "ModelConfig", "Pyramid", "TrainableConfig"]


class Pyramid(StrEnum):
    """Which stage outputs feed the decoders: the official code's (stage i after patch merging i+1) or timm's."""

    official = "official"
    timm = "timm"


class CompileMode(StrEnum):
    """``model.compile``: eager, ``torch.compile`` of the whole model, or of each Swin block."""

    none = "none"
    model = "model"
    blocks = "blocks"


@dataclass
class ModelConfig:
    """Backbone and decoder settings; fields map onto :class:`MTLoRASwin` and :class:`TaskDecoder`.

    ``backbone_kwargs`` go straight to ``timm.create_model`` (e.g. ``embed_dim``, ``depths``,
    ``num_heads``, ``window_size`` for a tiny test model).

    ``compile``: ``none`` (eager, the default: on a CPU compiled steps are not faster, see
    docs/performance-model.md), ``model`` (``torch.compile`` of the whole forward, one graph) or
    ``blocks`` (each distinct Swin block, shorter compiles); applied by
    :func:`mtlora_dist.models.compile.compile_model` after the model moves to its device.
    """

    backbone: str = "swin_tiny_patch4_window7_224"
    img_size: list[int] = field(default_factory=lambda: [448, 448])
    pretrained: str | None = None
    drop_path_rate: float = 0.2
    pyramid: Pyramid = Pyramid.official
    dynamic_img_size: bool = True
    grad_checkpointing: bool = False
    compile: CompileMode = CompileMode.none
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    decoder_channels: list[int] = field(default_factory=lambda: [18, 36, 72, 144])
    head_hidden_channels: int = 1080
    sync_bn: bool = True


@dataclass
class TrainableConfig:
    """Switches per parameter group; everything not named here stays frozen."""

    lora: bool = True
    norms: bool = True
    relative_position_bias: bool = True
    patch_embed: bool = True
    downsample_reduction: bool = True  # frozen anyway when the reduction carries LoRA (MTLoRA+)
    decoders: bool = True
