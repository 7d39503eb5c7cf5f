"""MTLoRALinear against a straightforward per-task reference of spec Part B §1.1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtlora_dist.adapters.dropout import DropMask
from mtlora_dist.adapters.mtlora_linear import MTLoRALinear

from factories import randomize_lora

TASKS = ("a", "b", "c")


def reference(layer: MTLoRALinear, x: torch.Tensor, x_tasks: dict | None):
    """The official forward, one task at a time (dropout off)."""
    w, b = layer.weight, layer.bias
    p = F.linear(x, w, b)
    scales = layer._task_scales()
    u = {}
    for i, t in enumerate(layer.tasks):
        z = x if x_tasks is None else x_tasks[t]
        u[t] = scales[i] * (z @ layer.lora_tasks_A[t].T @ layer.lora_tasks_B[t].T)
    shared_delta = (
        layer.lora_shared_scale * (x @ layer.lora_shared_A.T @ layer.lora_shared_B.T) if layer.shared_rank else 0
    )
    if layer.mode == "addition":
        shared = p + layer.lora_norm(sum(p + u[t] for t in layer.tasks))
        tasks = {t: p + u[t] for t in layer.tasks}
    elif layer.mode == "matrixv2":
        shared = p + shared_delta
        tasks = {t: p + shared_delta + u[t] for t in layer.tasks}
    else:
        shared = p + shared_delta
        tasks = {t: p + u[t] for t in layer.tasks}
    return shared, tasks


@pytest.mark.parametrize("mode", ["matrix", "matrixv2", "addition"])
@pytest.mark.parametrize("task_input", [False, True])
@pytest.mark.parametrize("ranks", [4, {"a": 2, "b": 5, "c": 3}])
def test_batched_forward_matches_per_task_reference(mode, task_input, ranks):
    torch.manual_seed(0)
    layer = MTLoRALinear(
        12,
        10,
        shared_rank=6,
        tasks=TASKS,
        task_rank=ranks,
        mode=mode,
        task_scale={"a": 1.0, "b": 2.0, "c": 4.0},
        task_input=task_input,
    ).eval()
    randomize_lora(layer, std=0.1)
    x = torch.randn(2, 7, 12)
    x_tasks = {t: torch.randn(2, 7, 12) for t in TASKS} if task_input else None
    inp = torch.cat([x] + [x_tasks[t] for t in TASKS]) if task_input else x
    out = layer(inp).unflatten(0, (1 + len(TASKS), 2))
    shared, tasks = reference(layer, x, x_tasks)
    torch.testing.assert_close(out[0], shared)
    for i, t in enumerate(TASKS):
        torch.testing.assert_close(out[1 + i], tasks[t])


def test_lora_only_and_plain_layer_have_no_task_streams():
    layer = MTLoRALinear(8, 4, shared_rank=2, tasks=TASKS, task_rank=2, mode="lora_only").eval()
    randomize_lora(layer, std=0.1)
    x = torch.randn(3, 8)
    expected = F.linear(x, layer.weight, layer.bias) + 4.0 * (x @ layer.lora_shared_A.T @ layer.lora_shared_B.T)
    torch.testing.assert_close(layer(x), expected)
    assert layer.tasks == ()


def test_zero_b_means_every_stream_equals_frozen_output():
    layer = MTLoRALinear(8, 5, shared_rank=4, tasks=TASKS, task_rank=2, dropout=0.5).train()
    x = torch.randn(4, 8)
    out = layer(x).unflatten(0, (4, 4))
    frozen = F.linear(x, layer.weight, layer.bias)
    for s in range(4):
        assert torch.equal(out[s], frozen)


@pytest.mark.parametrize("mode,tasks", [("matrix", ()), ("matrixv2", TASKS), ("lora_only", ())])
def test_merge_equals_unmerged_and_unmerge_restores(mode, tasks):
    torch.manual_seed(1)
    layer = MTLoRALinear(16, 8, shared_rank=4, tasks=tasks, task_rank=2, mode=mode).eval()
    randomize_lora(layer, std=0.1)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 16)
    before = layer(x)
    layer.merge()
    assert not torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


def test_matrix_mode_with_tasks_refuses_to_merge():
    layer = MTLoRALinear(8, 8, shared_rank=2, tasks=TASKS, task_rank=2)
    assert not layer.can_merge
    with pytest.raises(ValueError, match="cannot merge"):
        layer.merge()


def test_trainable_scales_receive_gradients_and_fixed_ones_are_buffers():
    layer = MTLoRALinear(
        6, 6, shared_rank=2, tasks=TASKS, task_rank=2, trainable_scale_shared=True, trainable_scale_per_task=True
    )
    randomize_lora(layer, std=0.1)
    layer(torch.randn(2, 6)).sum().backward()
    assert layer.lora_shared_scale.grad is not None and layer.lora_shared_scale.grad.abs().sum() > 0
    assert all(layer.lora_task_scale[t].grad.abs().sum() > 0 for t in TASKS)
    fixed = MTLoRALinear(6, 6, shared_rank=2, tasks=TASKS, task_rank=2)
    assert "lora_shared_scale" in dict(fixed.named_buffers())
    assert not any("scale" in n for n, _ in fixed.named_parameters())


def test_dropout_hits_shared_input_only_and_shares_mask_with_task_branches():
    torch.manual_seed(0)
    layer = MTLoRALinear(32, 4, shared_rank=2, tasks=("a",), task_rank=2, dropout=0.5).train()
    randomize_lora(layer, std=0.1)
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    out = layer(x).unflatten(0, (2, 64))
    torch.manual_seed(3)
    dropped = DropMask(x.shape, 0.5).apply(x)  # the layer's one draw, replayed
    assert 0.3 < (dropped == 0).float().mean() < 0.7
    p = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(out[0], p + 4.0 * (dropped @ layer.lora_shared_A.T @ layer.lora_shared_B.T))
    torch.testing.assert_close(out[1], p + 4.0 * (dropped @ layer.lora_tasks_A["a"].T @ layer.lora_tasks_B["a"].T))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown MTLoRA mode"):
        MTLoRALinear(4, 4, shared_rank=2, mode="sum")
    with pytest.raises(ValueError, match="no entry for task"):
        MTLoRALinear(4, 4, shared_rank=2, tasks=TASKS, task_rank={"a": 2})
