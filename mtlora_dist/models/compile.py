"""``model.compile``: ``torch.compile`` the model whole, or block by block, in place.

In place (``nn.Module.compile``) rather than ``torch.compile(model)``: the wrapper that returns would
prefix every state-dict key with ``_orig_mod.``, and checkpoints, the trainable-parameter policy and
exports name parameters as the plain model does.

The model traces into one graph per input shape with no break (the LoRA dropout draws its mask with a
compile-friendly sampler under compile, see :mod:`mtlora_dist.adapters.dropout`), so ``dynamic=False``:
a new input shape (the evaluation batch) compiles one more graph instead of a dynamic one, and
training steps after the first reuse the graph (``tests/models/test_compile.py``).

``blocks`` compiles the Swin block function once per distinct block (stage width, shifted or not,
task streams or not, drop-path rate) and leaves the glue between blocks (patch merging, stream split,
decoders) eager. Blocks that differ in none of these share a graph; with drop-path on, timm gives
every block its own rate, a constant in the graph, so every block gets its own (12 for Swin-T). All
blocks run one Python function, whose compiled versions dynamo caches on that function's code; the
cache limit is raised to the model's block count so no block falls back to eager (one graph per
distinct block, not a recompile: nothing recompiles after the first step).
"""

from __future__ import annotations

import torch
from torch import nn

from mtlora_dist.models.config import CompileMode

__all__ = ["CompileMode", "compile_model"]


def _blocks(model: nn.Module) -> list[nn.Module]:
    backbone = getattr(model, "backbone", model)
    return [block for stage in backbone.layers for block in stage.blocks]


def compile_model(model: nn.Module, mode: CompileMode | str, backend: str = "inductor") -> nn.Module:
    """Compile ``model`` (a :class:`MultiTaskSwin` or :class:`MTLoRASwin`) in place; returns it.

    ``mode``: ``none`` (eager), ``model`` (one graph for the forward) or ``blocks`` (one per distinct
    Swin block). ``backend``: any ``torch.compile`` backend (``aot_eager`` traces without code
    generation, for tests).
    """
    try:
        mode = CompileMode(mode)
    except ValueError:
        raise ValueError(f"model.compile must be one of {[m.value for m in CompileMode]}, got {mode!r}") from None
    if mode == CompileMode.none:
        return model
    if mode == CompileMode.model:
        model.compile(backend=backend, dynamic=False)
        return model
    backbone = getattr(model, "backbone", model)
    blocks = _blocks(model)
    limit = max(torch._dynamo.config.recompile_limit, len(blocks))
    torch._dynamo.config.recompile_limit = limit
    backbone.block_forward = torch.compile(type(backbone)._block_forward, backend=backend, dynamic=False)
    return model
