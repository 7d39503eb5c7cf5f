"""Which parameters train (spec Part B §4.1, Part A 3; docs/methods.md): a parameter's group is decided
by its name once, here; the same groups drive freezing, the parameter report and the optimizer's
weight-decay split.

MTLoRA trains adapters, a few norms and tables, and the decoders; the baselines of the paper's Table 1
switch groups on or off (``trainable.*``, set by the ``method=`` config group): full fine-tuning turns
on ``backbone`` (every backbone parameter), BitFit ``biases``, decoders-only only ``decoders``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from mtlora_dist.models.config import TrainableConfig

__all__ = ["TrainableConfig", "parameter_group", "apply_trainable_policy", "is_backbone"]

_BLOCK_LINEARS = (".attn.qkv.", ".attn.proj.", ".mlp.fc1.", ".mlp.fc2.")


def parameter_group(name: str, module_of_param: nn.Module | None = None) -> str:
    """Group of a parameter of the multi-task model, from its qualified name."""
    if name.startswith("decoders."):
        return "decoders"
    if "lora_" in name:
        return "lora_scale" if "scale" in name else "lora"
    if ".patch_embed." in f".{name}":
        return "patch_embed"
    if "relative_position_bias_table" in name:
        return "relative_position_bias"
    if "norm" in name.rsplit(".", 2)[-2]:
        return "norms"
    if "downsample.reduction" in name:
        return "downsample_reduction"
    if any(part in name for part in _BLOCK_LINEARS):
        return "linears"  # the pretrained qkv/proj/fc1/fc2 weights and biases: frozen under MTLoRA
    return "other"


def is_backbone(name: str) -> bool:
    """Everything but the task decoders (adapters included)."""
    return not name.startswith("decoders.")


def apply_trainable_policy(model: nn.Module, cfg: TrainableConfig) -> dict[str, str]:
    """Set ``requires_grad`` on every parameter; returns name -> group."""
    switches = {
        "lora": cfg.lora,
        "lora_scale": cfg.lora,
        "norms": cfg.norms,
        "relative_position_bias": cfg.relative_position_bias,
        "patch_embed": cfg.patch_embed,
        "downsample_reduction": cfg.downsample_reduction,
        "decoders": cfg.decoders,
        "linears": False,
        "other": False,
    }
    lora_reductions = {
        n for n, m in model.named_modules() if n.endswith("downsample.reduction") and hasattr(m, "lora_shared_A")
    }
    groups: dict[str, str] = OrderedDict()
    for name, param in model.named_parameters():
        group = parameter_group(name)
        trainable = switches[group]
        if group == "downsample_reduction" and name.rsplit(".", 1)[0] in lora_reductions:
            trainable = False  # MTLoRA+: the adapter trains, the reduction weight stays frozen
        if is_backbone(name) and (cfg.backbone or (cfg.biases and name.endswith(".bias"))):
            trainable = True
        if group == "lora_scale":
            trainable = trainable and param.dtype.is_floating_point
        param.requires_grad_(trainable)
        groups[name] = group
    return groups
