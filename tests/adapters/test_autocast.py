"""The LoRA ops and a whole MTLoRA model under ``torch.autocast`` (CPU, bf16) against fp32.

Under autocast the fused ops compute in the autocast dtype (like ``F.linear``), so outputs match the
fp32 ones to bf16 precision and fp32 parameters get fp32 gradients; outside autocast nothing changes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from mtlora_dist.adapters import AdapterConfig
from mtlora_dist.adapters.dropout import DropMask, hashed_masks
from mtlora_dist.adapters.fused import lora_linear
from mtlora_dist.adapters.mtlora_linear import MTLoRALinear
from mtlora_dist.models import build_model
from mtlora_dist.models.trainable import TrainableConfig

from factories import randomize_lora, task_lora_positional, tiny_model_config

D_IN, D_OUT, RANK, TASKS, TASK_RANK, N = 48, 40, 4, 3, 2, 96
BF16_TOL = 2e-2  # relative error of a few bf16 GEMMs (bf16 keeps 8 bits: 4e-3 per rounding)
DROPOUTS = [(0.0, None), (0.2, True), (0.2, False)]
DROPOUT_IDS = ["no-dropout", "positions", "keep-mask"]


def _autocast(enabled: bool = True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float() - want.detach()).norm() / want.detach().norm())


def _run(fn, inputs: tuple, autocast: bool) -> tuple[torch.Tensor, list]:
    """Output and the gradients of every input that requires one, with forward under autocast or not."""
    with _autocast(autocast):
        out = fn(*inputs)
    loss = out.float().square().sum()  # backward outside the autocast region, as torch recommends
    grads = torch.autograd.grad(loss, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad])
    return out, list(grads)


def _assert_autocast_matches_fp32(fn, inputs: tuple) -> None:
    ref_out, ref_grads = _run(fn, inputs, autocast=False)
    out, grads = _run(fn, inputs, autocast=True)
    assert out.dtype == torch.bfloat16 and ref_out.dtype == torch.float32
    assert _rel(out, ref_out) < BF16_TOL
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        assert _rel(g, ref) < BF16_TOL


def _param(*shape, grad=True):
    return torch.randn(*shape, requires_grad=grad)


@pytest.mark.parametrize("dropout,positions", DROPOUTS, ids=DROPOUT_IDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_linear_under_autocast_matches_fp32(dropout, positions, with_bias):
    torch.manual_seed(0)
    x, a, b = _param(2, N, D_IN), _param(RANK, D_IN), _param(D_OUT, RANK)
    scale = torch.tensor([2.0], requires_grad=True)
    w, bias = _param(D_OUT, D_IN, grad=False), _param(D_OUT, grad=False) if with_bias else None
    mask = DropMask((2 * N, D_IN), dropout, positions=positions) if dropout else None
    _assert_autocast_matches_fp32(lambda *t: lora_linear(*t, mask=mask), (x, w, bias, a, b, scale))


@pytest.mark.parametrize("dropout,positions", DROPOUTS, ids=DROPOUT_IDS)
@pytest.mark.parametrize("task_input", [False, True])
@pytest.mark.parametrize("shared_in_tasks", [False, True])
def test_task_lora_linear_under_autocast_matches_fp32(dropout, positions, task_input, shared_in_tasks):
    torch.manual_seed(1)
    x = _param(1 + TASKS, N, D_IN) if task_input else _param(N, D_IN)
    w, bias = _param(D_OUT, D_IN, grad=False), _param(D_OUT, grad=False)
    shared = (_param(RANK, D_IN), _param(D_OUT, RANK), torch.tensor([2.0], requires_grad=True))
    task_a, task_bt = _param(TASKS, TASK_RANK, D_IN), _param(TASKS, TASK_RANK, D_OUT)
    task_scale = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    mask = DropMask((N, D_IN), dropout, positions=positions) if dropout else None

    run = task_lora_positional(task_input, shared_in_tasks, mask)

    _assert_autocast_matches_fp32(run, (x, w, bias, task_a, task_bt, task_scale) + shared)


@pytest.mark.parametrize("mode", ["matrix", "matrixv2", "addition", "lora_only"])
def test_layer_under_autocast_matches_fp32(mode):
    """Every layer mode, ``addition`` (composed from ordinary ops) included, with trainable scales."""
    torch.manual_seed(2)
    layer = MTLoRALinear(
        D_IN,
        D_OUT,
        shared_rank=RANK,
        tasks=("a", "b"),
        task_rank=TASK_RANK,
        mode=mode,
        trainable_scale_shared=True,
        trainable_scale_per_task=True,
        dropout=0.2,
    ).train()
    randomize_lora(layer, std=0.3)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = _param(N, D_IN)
    params = [p for p in layer.parameters() if p.requires_grad]

    def run(x, *_params):
        torch.manual_seed(3)  # the same dropout draw in both runs
        return layer(x)

    _assert_autocast_matches_fp32(run, (x, *params))


def test_backward_inside_autocast_after_fp32_forward_stays_fp32():
    """Autocast on during backward only must not change the fp32 gradients (backward turns it off)."""
    torch.manual_seed(4)
    x, a, b, scale = _param(N, D_IN), _param(RANK, D_IN), _param(D_OUT, RANK), torch.tensor([2.0])
    w, bias = _param(D_OUT, D_IN, grad=False), _param(D_OUT, grad=False)
    mask = DropMask((N, D_IN), 0.2)
    grads = []
    for autocast_in_backward in (False, True):
        out = lora_linear(x, w, bias, a, b, scale, mask=mask)
        with _autocast(autocast_in_backward):
            grads.append(torch.autograd.grad(out.square().sum(), (x, a, b)))
    for g, ref in zip(*grads, strict=True):
        assert torch.equal(g, ref)


def test_tiny_model_under_autocast_matches_fp32():
    """Forward and backward of a whole MTLoRA model (dropout on) under bf16 autocast."""
    torch.manual_seed(0)
    tasks = ["semseg", "normals"]
    cfg = tiny_model_config(drop_path_rate=0.1)
    model = build_model(
        cfg, AdapterConfig(shared_rank=2, task_rank=2, dropout=0.1), TrainableConfig(), tasks, "pascal_context"
    ).train()
    randomize_lora(model, std=0.05)
    for t in tasks:
        model.decoders[t].head.fuse[1].eval()  # no batch-statistics update between the two runs
    x = torch.randn(2, 3, 64, 64)
    runs = []
    for autocast in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same LoRA dropout and drop-path draws
        with _autocast(autocast):
            out = model(x)
        sum(o.float().square().mean() for o in out.values()).backward()
        runs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (ref_out, ref_grads), (out, grads) = runs
    for t in tasks:
        assert _rel(out[t], ref_out[t]) < BF16_TOL
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    assert all(g.dtype == torch.float32 for g in grads.values())
    # bf16 rounding through ~30 layers: each tensor within 15 %, all of them together within 3 %
    assert max(_rel(grads[n], ref_grads[n]) for n in grads) < 0.15
    flat, ref_flat = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads, ref_grads))
    assert _rel(flat, ref_flat) < 0.03


@pytest.mark.parametrize("mode", ["matrix", "lora_only"], ids=["task_lora_linear", "lora_linear"])
def test_compiled_layer_keeps_the_autocast_rules(mode):
    """Both fused ops traced whole by ``torch.compile`` (``fullgraph``) under bf16 autocast: bf16 output
    and fp32 gradients, as eager gives them with the same (hashed) dropout draw."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    layer = MTLoRALinear(D_IN, D_OUT, shared_rank=RANK, tasks=("a", "b"), task_rank=TASK_RANK, mode=mode, dropout=0.2)
    randomize_lora(layer.train(), std=0.3)
    layer.weight.requires_grad_(False)
    x = _param(N, D_IN)
    params = [p for p in layer.parameters() if p.requires_grad]
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    results = []
    for fn, hashed in ((compiled, False), (layer, True)):
        torch.manual_seed(6)
        with hashed_masks() if hashed else contextlib.nullcontext(), _autocast():
            out = fn(x)
        results.append((out, torch.autograd.grad(out.float().square().sum(), [x, *params])))
    (out, grads), (ref_out, ref_grads) = results
    assert out.dtype == ref_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_out)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, ref, rtol=BF16_TOL, atol=1e-3)
