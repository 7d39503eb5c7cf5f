"""Load timm Swin weights from a local file into an MTLoRA backbone by timm's own key names.

No hub access: the file is a timm/official Swin checkpoint (``.pth``, ``.bin`` or ``.safetensors``).
Keys are passed through timm's ``checkpoint_filter_fn`` (official->timm renames, relative-position
table resizing), so both official Swin releases and timm state dicts load.
"""

from __future__ import annotations

import os

import torch
from timm.models.swin_transformer import checkpoint_filter_fn
from torch import nn

__all__ = ["PretrainedWeightsError", "load_pretrained_swin", "read_state_dict"]

# Parts of a classification Swin the dense model does not have (spec B §2.1).
_UNUSED_PREFIXES = ("norm.", "head.", "layers.0.downsample.")


class PretrainedWeightsError(ValueError):
    """``model.pretrained`` is not a Swin state dict that fits ``model.backbone`` (a user's file: exit 2)."""


_NOT_WEIGHTS = (
    "set model.pretrained to a timm or official Swin checkpoint of model.backbone (a state dict of tensors in a "
    ".pth/.bin or .safetensors file), or null for random weights"
)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read tensors from a checkpoint file without unpickling arbitrary objects."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained checkpoint '{path}' does not exist; set model.pretrained to a "
            "local timm Swin checkpoint file, or null for random weights"
        )
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch and safetensors raise many types for a file that is not weights
        # torch's own message for a pickle holding code suggests weights_only=False: never repeat that advice
        raise PretrainedWeightsError(
            f"pretrained checkpoint '{path}' cannot be read as tensors ({type(err).__name__}): it is not a "
            f"weights file, or it holds Python objects, which are never unpickled; {_NOT_WEIGHTS}"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"pretrained checkpoint '{path}' is not a mapping of tensors; {_NOT_WEIGHTS}")
    return state


def load_pretrained_swin(backbone: nn.Module, path: str) -> list[str]:
    """Load ``path`` into ``backbone``; returns the checkpoint keys that were not used.

    Raises with the offending keys when the file is not a Swin of this shape.
    """
    state = read_state_dict(path)
    try:
        state = checkpoint_filter_fn(state, backbone)
    except Exception as err:  # noqa: BLE001 - timm's renames fail on another model's keys
        raise PretrainedWeightsError(
            f"pretrained checkpoint '{path}' is not a Swin checkpoint ({type(err).__name__}: {err}); {_NOT_WEIGHTS}"
        ) from None
    unused = sorted(k for k in state if k.startswith(_UNUSED_PREFIXES))
    state = {k: v for k, v in state.items() if k not in set(unused)}
    own = backbone.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise PretrainedWeightsError(
            f"pretrained checkpoint '{path}' does not fit model.backbone; shape mismatches: "
            f"{mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}; {_NOT_WEIGHTS}"
        )
    result = backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if "lora_" not in k]
    if missing or result.unexpected_keys:
        raise PretrainedWeightsError(
            f"pretrained checkpoint '{path}' does not match model.backbone: missing "
            f"{missing[:8]}, unexpected {result.unexpected_keys[:8]}; {_NOT_WEIGHTS}"
        )
    return unused
