"""Turn a trained multi-task model into its inference form: fold into dense weights what the math allows.

Folded (exact up to float rounding; the export checks the outputs against the unfolded model):

* **TA-LoRA** of every layer whose outputs all use the adapted weight (``MTLoRALinear.can_merge``):
  ``W <- W + s_sh B_sh A_sh``. Such a layer has no task branches left and becomes a plain ``nn.Linear``
  (timm's own key names), so most of the backbone runs as an unadapted Swin.
* **BatchNorm** of every head into the 1x1 convolution before it (eval statistics).
* **TS-LoRA of the task ``attn.proj`` layers**, optionally (``fold_task_proj``): their task branches read
  the shared attention output ``o``, so every stream is affine in ``o``: ``a_t = (W + s_t B_t A_t) o + b``
  and the shared stream ``(W + s_sh B_sh A_sh) o + b``. One batched GEMM over the 1+T stacked weights
  replaces the frozen GEMM, the low-rank branches and the concatenation. It is exact, but it costs T extra
  dense GEMMs of the layer's size in exchange for T rank-r products: measured in
  ``docs/performance-export.md``, which is why it is off by default.

Not folded, because no single weight represents them:

* TS ``mlp.fc1``/``mlp.fc2``: task t's output is ``W x_shared + b + s_t B_t A_t z_t``, the frozen path on the
  shared stream and the task branch on the task's own stream ``z_t``: two inputs. In ``matrix`` mode their
  shared branch stays too (the task outputs use the bare ``W``).
* ``addition`` mode's LayerNorm over the task sum (not linear); TS proj layers in that mode stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from mtlora_dist.adapters.inject import mtlora_layers
from mtlora_dist.adapters.mtlora_linear import MTLoRALinear
from mtlora_dist.models import MultiTaskSwin

__all__ = ["MergeSummary", "StackedLinear", "output_difference", "to_inference"]

_AFFINE_TASK_MODES = ("matrix", "matrixv2")  # every stream is W_k x + b for a shared input x


@dataclass
class MergeSummary:
    """What :func:`to_inference` did; recorded in the export's ``export.json``."""

    fold_task_proj: bool
    ta_lora_merged: int = 0
    task_proj_folded: int = 0
    batchnorm_folded: int = 0
    adapters_left: list[str] = field(default_factory=list)  # layers that keep low-rank branches


class StackedLinear(nn.Module):
    """S dense maps of one shared input, stacked stream-major along the batch axis, the layout
    ``MTLoRALinear`` emits: (N, ..., d_in) -> (S*N, ..., d_out), as one batched GEMM."""

    def __init__(self, streams: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.streams, self.in_features, self.out_features = streams, in_features, out_features
        self.weight = nn.Parameter(torch.empty(streams, out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(streams, out_features), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(1, -1, self.in_features).expand(self.streams, -1, -1)  # no copy
        out = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight.transpose(1, 2))  # (S, M, d_out)
        return out.view(self.streams * lead[0], *lead[1:], self.out_features)

    def extra_repr(self) -> str:
        return f"streams={self.streams}, in_features={self.in_features}, out_features={self.out_features}"


@torch.no_grad()
def _stream_weights(layer: MTLoRALinear) -> Tensor:
    """(1+T, d_out, d_in): the weight each output stream applies to the layer's shared input, computed
    with the layer's own branch code on the identity basis."""
    eye = torch.eye(layer.in_features, dtype=layer.weight.dtype, device=layer.weight.device)
    shared = layer.weight.clone()
    if layer.shared_rank and not layer.merged:
        shared += layer.shared_delta(eye).T
    base = shared if layer.mode == "matrixv2" else layer.weight
    tasks = base.unsqueeze(0) + layer.task_delta(eye).transpose(1, 2)  # (T, d_out, d_in)
    return torch.cat([shared.unsqueeze(0), tasks])


def _stacked_from(layer: MTLoRALinear) -> StackedLinear:
    weights = _stream_weights(layer)
    stacked = StackedLinear(weights.shape[0], layer.in_features, layer.out_features).to(weights)
    stacked.weight.copy_(weights)
    if layer.bias is not None:
        stacked.bias.copy_(layer.bias.detach().expand_as(stacked.bias))
    return stacked


def _plain_linear(layer: MTLoRALinear) -> nn.Linear:
    """The frozen (possibly merged) weight as an ``nn.Linear`` sharing its tensors."""
    linear = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=layer.weight.dtype
    )
    linear.weight = layer.weight
    if layer.bias is not None:
        linear.bias = layer.bias
    return linear


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution in an ``nn.Sequential``."""
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], _BatchNorm):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
                folded += 1
    return folded


@torch.no_grad()
def output_difference(reference: nn.Module, folded: nn.Module, images: Tensor) -> dict[str, float]:
    """Per task, max |folded - reference| over ``images``, relative to max |reference| (at least 1)."""
    ref, out = reference(images), folded(images)
    return {
        t: float((out[t].float() - ref[t].float()).abs().max() / ref[t].float().abs().max().clamp_min(1.0)) for t in ref
    }


@torch.no_grad()
def to_inference(model: MultiTaskSwin, fold_task_proj: bool = False) -> MergeSummary:
    """Fold adapters and BatchNorm into ``model`` in place (see the module docstring); leaves it in eval
    mode with no trainable parameters. Build-then-fold gives the same structure for the same config,
    which is how an export is loaded again."""
    model.eval().requires_grad_(False)
    summary = MergeSummary(fold_task_proj=fold_task_proj)
    if fold_task_proj:
        for name, layer in mtlora_layers(model).items():
            if layer.tasks and not layer.task_input and layer.mode in _AFFINE_TASK_MODES:
                _replace(model, name, _stacked_from(layer))
                summary.task_proj_folded += 1
    summary.ta_lora_merged = model.backbone.merge_adapters()
    for name, layer in mtlora_layers(model).items():
        if not layer.tasks and (layer.merged or not layer.shared_rank):
            _replace(model, name, _plain_linear(layer))
        else:
            summary.adapters_left.append(name)
    summary.batchnorm_folded = _fold_batchnorm(model)
    return summary
