"""The cheap LoRA dropout: the same distribution as nn.Dropout, one draw applied to input and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from mtlora_dist.adapters.dropout import DropMask, LoRADropout, _dropped_positions, lora_dropout


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
