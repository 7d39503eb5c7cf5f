"""The cheap LoRA dropout: the same distribution as nn.Dropout, one draw applied to input and gradient."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from mtlora_dist.adapters.dropout import (
    DropMask,
    LoRADropout,
    _dropped_positions,
    _MaskedScale,
    hashed_masks,
    lora_dropout,
)
from mtlora_dist.adapters.fused import lora_linear, task_lora_linear
from mtlora_dist.adapters.mtlora_linear import MTLoRALinear


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_drop_positions_are_iid_bernoulli_over_the_whole_tensor(p):
    torch.manual_seed(0)
    n = 400_000
    pos = _dropped_positions(n, p, torch.device("cpu"))
    assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all())  # sorted, no repeats
    assert int(pos[0]) >= 0 and int(pos[-1]) < n
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[pos] = True
    for block in dropped.view(8, -1):  # every eighth of the tensor, the last included, drops at rate p
        sigma = math.sqrt(p * (1 - p) / block.numel())
        assert abs(block.double().mean().item() - p) < 6 * sigma
    # neighbours are independent: P(drop, drop) = p^2
    pair = (dropped[1:] & dropped[:-1]).double().mean().item()
    assert abs(pair - p * p) < 6 * math.sqrt(p * p * (1 - p * p) / n)


def test_tiny_tensors_and_tiny_rates():
    torch.manual_seed(1)
    for n in (1, 2, 7):
        pos = _dropped_positions(n, 0.5, torch.device("cpu"))
        assert bool(((pos >= 0) & (pos < n)).all())
    assert _dropped_positions(1000, 1e-6, torch.device("cpu")).numel() <= 1


@pytest.mark.parametrize("positions", [True, False], ids=["positions", "keep-mask"])
def test_mask_scales_kept_elements_and_zeroes_dropped_ones(positions):
    """Both samplers: dropped positions (the CPU default) and a dense keep-mask (the accelerator default)."""
    torch.manual_seed(2)
    x = torch.randn(64, 48)
    mask = DropMask(x.shape, 0.25, positions=positions)
    y = mask.apply(x)
    if positions:
        dropped = torch.zeros(x.numel(), dtype=torch.bool)
        dropped[mask.positions] = True
        dropped = dropped.view_as(x)
    else:
        dropped = ~mask.keep
    assert 0.15 < dropped.float().mean() < 0.35
    assert bool((y[dropped] == 0).all())
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.75)
    torch.testing.assert_close(mask.dense(), (~dropped).float() / 0.75)
    with pytest.raises(ValueError, match="applied to"):
        mask.apply(torch.randn(48, 64))


def test_gradient_goes_through_the_same_mask_and_draws_replay_under_a_seed():
    x = torch.randn(32, 16, requires_grad=True)
    torch.manual_seed(3)
    y = lora_dropout(x, 0.4)
    y.backward(torch.ones_like(y))
    torch.manual_seed(3)
    expected = DropMask(x.shape, 0.4).dense()
    torch.testing.assert_close(x.grad, expected)
    torch.testing.assert_close(y, x.detach() * expected)


def test_module_is_identity_when_off_or_in_eval():
    x = torch.randn(4, 4)
    assert LoRADropout(0.0)(x) is x
    assert LoRADropout(0.5).eval()(x) is x
    assert not torch.equal(LoRADropout(0.5).train()(torch.ones(64, 64)), torch.ones(64, 64))
    with pytest.raises(ValueError, match="adapter.dropout"):
        LoRADropout(1.0)
    with pytest.raises(ValueError, match="dropout rate"):
        DropMask((2, 2), 0.0)


@pytest.mark.parametrize("positions", [True, False], ids=["positions", "keep-mask"])
def test_a_mask_redraws_the_same_elements_from_its_seed_at_rate_p(positions):
    """Both samplers, drawn through the mask's own generator: the same draw on every use, Bernoulli(p)."""
    torch.manual_seed(5)
    p, shape = 0.1, (500, 400)
    mask = DropMask(shape, p, positions=positions)
    first, second = mask.dense(), mask.dense()
    assert torch.equal(first, second)
    torch.manual_seed(5)
    assert torch.equal(DropMask(shape, p, positions=positions).dense(), first)  # the seed replays
    assert not torch.equal(DropMask(shape, p, positions=positions).dense(), first)  # a fresh seed does not
    n = first.numel()
    assert abs((first == 0).double().mean().item() - p) < 6 * math.sqrt(p * (1 - p) / n)


def _tensors_held_by_graph(root: torch.Tensor) -> list[torch.Tensor]:
    """Tensors reachable from the Python attributes of the autograd nodes behind ``root``.

    Saved tensors are not attributes (gradient checkpointing can drop and recompute them); anything
    found here lives as long as the graph does.
    """
    found, seen, stack = [], set(), [root.grad_fn]

    def scan(value, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                scan(v, depth)
        elif isinstance(value, dict):
            for v in value.values():
                scan(v, depth)
        elif hasattr(value, "__dict__") and depth < 3 and not isinstance(value, type):
            for v in vars(value).values():
                scan(v, depth + 1)

    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        scan(getattr(node, "__dict__", {}))
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def _layer(tasks: tuple[str, ...]) -> MTLoRALinear:
    layer = MTLoRALinear(32, 24, shared_rank=4, tasks=tasks, task_rank=2, dropout=0.3).train()
    with torch.no_grad():
        for name, prm in layer.named_parameters():
            if "lora_" in name and "scale" not in name:
                prm.normal_(std=0.3)
    return layer


def _ops(positions: bool) -> dict:
    """Every way a dropout mask reaches the graph, each drawing its mask inside the call."""
    w, a, b, s = torch.randn(24, 32), torch.randn(4, 32, requires_grad=True), torch.randn(24, 4), torch.tensor([2.0])
    ta, tb, ts = torch.randn(2, 2, 32, requires_grad=True), torch.randn(2, 2, 24), torch.ones(2)
    return {
        "lora_linear": lambda x: lora_linear(x, w, None, a, b, s, mask=DropMask(x.shape, 0.3, positions=positions)),
        "task_lora_linear": lambda x: task_lora_linear(
            x,
            w,
            None,
            (a, b, s),
            ta,
            tb,
            ts,
            task_input=False,
            shared_in_tasks=False,
            mask=DropMask(x.shape, 0.3, positions=positions),
        ),
        "lora_dropout": lambda x: _MaskedScale.apply(x, DropMask(x.shape, 0.3, positions=positions)),
    }


@pytest.mark.parametrize("positions", [True, False], ids=["positions", "keep-mask"])
@pytest.mark.parametrize("op", ["lora_linear", "task_lora_linear", "lora_dropout"])
def test_no_mask_tensor_is_kept_on_the_graph(op, positions):
    x = torch.randn(64, 32, requires_grad=True)
    out = _ops(positions)[op](x)
    assert _tensors_held_by_graph(out) == []


class _RecordCreated(TorchDispatchMode):
    """Weak references to every bool/int64 tensor (dropout positions, keep-masks) an op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.int64):
                self.created.append(weakref.ref(t))
        return out


@pytest.mark.parametrize("tasks", [(), ("a", "b")], ids=["lora_linear", "task_lora_linear"])
def test_checkpointing_frees_every_mask_and_keeps_the_gradients(tasks):
    """With non-reentrant checkpointing a layer keeps no mask tensor alive between forward and
    backward, and the recompute still gives the gradients of the plain run."""
    layer = _layer(tasks)
    x = torch.randn(64, 32, requires_grad=True)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(7)
        recorder = _RecordCreated()
        with recorder:
            out = checkpoint(layer, x, use_reentrant=False) if ckpt else layer(x)
        if ckpt:
            gc.collect()
            assert recorder.created and all(ref() is None for ref in recorder.created), "a mask outlived forward"
        grads.append(torch.autograd.grad(out.square().sum(), [x, *layer.parameters()], allow_unused=True))
    for g, ref in zip(*grads, strict=True):
        assert (g is None) == (ref is None)
        if g is not None:
            torch.testing.assert_close(g, ref, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_hashed_sampler_is_iid_bernoulli_and_replays(p):
    """The compile-friendly sampler: rate p in every eighth of the tensor, independent neighbours,
    the same elements on every use of a mask, and ``torch.manual_seed`` replays its seed."""
    n = 400_000
    with hashed_masks():
        torch.manual_seed(8)
        mask = DropMask((n,), p)
        torch.manual_seed(8)
        again = DropMask((n,), p)
    assert mask.hashed and isinstance(mask.seed, torch.Tensor)
    dropped = ~mask.keep
    assert torch.equal(dropped, ~mask.keep) and torch.equal(dropped, ~again.keep)
    for block in dropped.view(8, -1):
        assert abs(block.double().mean().item() - p) < 6 * math.sqrt(p * (1 - p) / block.numel())
    pair = (dropped[1:] & dropped[:-1]).double().mean().item()
    assert abs(pair - p * p) < 6 * math.sqrt(p * p * (1 - p * p) / n)
    with hashed_masks():
        other = DropMask((n,), p)
    assert not torch.equal(~other.keep, dropped)
    assert not DropMask((n,), p).hashed  # eager code outside the context keeps the cheaper samplers
