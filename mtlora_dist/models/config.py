"""Model and trainable-parameter settings, torch-free so a run's configuration can be checked before
torch is imported. :func:`mtlora_dist.models.build_model` consumes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtlora_dist.choices import StrEnum

__all__ = ["CompileMode", "Method", "MethodConfig", "ModelConfig", "Pyramid", "TrainableConfig", "check_method"]


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
    """Switches per parameter group (:func:`mtlora_dist.models.trainable.parameter_group`); a parameter
    trains when its group's switch is on, or ``biases`` is on and it is a backbone bias, or ``backbone``
    is on and it is in the backbone. The defaults are MTLoRA's set (spec B §4.1)."""

    lora: bool = True
    norms: bool = True
    relative_position_bias: bool = True
    patch_embed: bool = True
    downsample_reduction: bool = True  # frozen anyway when the reduction carries LoRA (MTLoRA+)
    decoders: bool = True
    biases: bool = False  # every backbone bias, whatever its group (BitFit)
    backbone: bool = False  # every backbone parameter (full fine-tuning)


class Method(StrEnum):
    """What is trained (``method=`` config group, configs/method/, docs/methods.md)."""

    mtlora = "mtlora"  # the adapter group's MTLoRA as configured (the default; MTLoRA+ with adapter=mtlora_plus_*)
    mtlora_plus = "mtlora_plus"  # MTLoRA + low-rank adapters on the patch-merging reductions
    full_ft = "full_ft"  # multi-task full fine-tuning: no adapters, everything trains
    single_task = "single_task"  # full fine-tuning of one task's model (data.tasks=[t]; one run per task)
    decoders_only = "decoders_only"  # frozen backbone, the task decoders train
    bitfit = "bitfit"  # backbone biases + decoders
    lora = "lora"  # task-agnostic LoRA (the adapter group's shared rank) + decoders; no task-specific modules


@dataclass
class MethodConfig:
    """The method's name; its settings are the ``adapter.*`` and ``trainable.*`` keys its config group
    option sets (configs/method/<name>.yaml), so a run's saved config says what trained."""

    name: Method = Method.mtlora


def check_method(method: MethodConfig, tasks: list[str]) -> None:
    """A single-task run trains one task's model; the sweep (or the user) runs one per task."""
    if method.name == Method.single_task and len(tasks) != 1:
        raise ValueError(
            f"method=single_task trains one model per task, but data.tasks is {list(tasks)}: run it once per "
            f"task with data.tasks=[{tasks[0] if tasks else 'semseg'}] (or use method=full_ft for one multi-task model)"
        )
