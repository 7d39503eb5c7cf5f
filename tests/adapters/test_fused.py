"""The hand-written autograd ops of the LoRA layers against the composed math, and gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtlora_dist.adapters.dropout import DropMask
from mtlora_dist.adapters.fused import lora_linear

from factories import task_lora_positional

D_IN, D_OUT, RANK, TASKS, TASK_RANK, N = 6, 5, 3, 3, 2, 7


def _f64(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("dropout,positions", [(0.0, None), (0.3, True), (0.3, False)])
@pytest.mark.parametrize("train_frozen", [False, True])
def test_lora_linear_matches_composed_math_and_passes_gradcheck(dropout, positions, train_frozen):
    torch.manual_seed(0)
    x, a, b, scale = _f64(2, N, D_IN), _f64(RANK, D_IN), _f64(D_OUT, RANK), _f64(1)
    w, bias = _f64(D_OUT, D_IN, grad=train_frozen), _f64(D_OUT, grad=train_frozen)
    mask = DropMask((2 * N, D_IN), dropout, positions=positions) if dropout else None
    dense = mask.dense(torch.float64).view(2, N, D_IN) if mask else 1.0

    ours = lora_linear(x, w, bias, a, b, scale, mask=mask)
    composed = F.linear(x, w, bias) + scale * ((x * dense) @ a.T @ b.T)
    torch.testing.assert_close(ours, composed)
    inputs = (x, w, bias, a, b, scale)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, mask=mask), inputs)


def test_lora_linear_gives_frozen_weights_no_gradient():
    x, a, b, scale = _f64(N, D_IN), _f64(RANK, D_IN), _f64(D_OUT, RANK), torch.tensor([4.0], dtype=torch.float64)
    w, bias = _f64(D_OUT, D_IN, grad=False), _f64(D_OUT, grad=False)
    lora_linear(x, w, bias, a, b, scale, dropout=0.5).sum().backward()
    assert w.grad is None and bias.grad is None and a.grad is not None and b.grad is not None


@pytest.mark.parametrize("task_input", [False, True])
@pytest.mark.parametrize("shared_in_tasks", [False, True])
@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("dropout,positions", [(0.0, None), (0.3, True), (0.3, False)])
def test_task_lora_linear_matches_per_task_math_and_passes_gradcheck(
    task_input, shared_in_tasks, with_shared, dropout, positions
):
    torch.manual_seed(1)
    x = _f64(1 + TASKS, N, D_IN) if task_input else _f64(N, D_IN)
    w, bias = _f64(D_OUT, D_IN), _f64(D_OUT)
    shared = (_f64(RANK, D_IN), _f64(D_OUT, RANK), _f64(1)) if with_shared else None
    task_a, task_bt, task_scale = _f64(TASKS, TASK_RANK, D_IN), _f64(TASKS, TASK_RANK, D_OUT), _f64(TASKS)
    mask = DropMask((N, D_IN), dropout, positions=positions) if dropout else None

    run = task_lora_positional(task_input, shared_in_tasks, mask)

    inputs = (x, w, bias, task_a, task_bt, task_scale) + (shared or ())
    out = run(*inputs)
    x0 = x[0] if task_input else x
    x0_drop = mask.apply(x0) if mask else x0
    frozen = F.linear(x0, w, bias)
    shared_out = frozen + (shared[2] * (x0_drop @ shared[0].T @ shared[1].T) if shared else 0)
    base = shared_out if shared_in_tasks else frozen
    assert out.shape == (1 + TASKS, N, D_OUT)
    torch.testing.assert_close(out[0], shared_out)
    for t in range(TASKS):
        z = x[1 + t] if task_input else x0_drop
        torch.testing.assert_close(out[1 + t], base + task_scale[t] * (z @ task_a[t].T @ task_bt[t]))
    assert torch.autograd.gradcheck(run, inputs)
