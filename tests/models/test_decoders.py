"""Decoder pieces: the fp32 BatchNorm used in the heads, and the head against the spec's literal form."""

from __future__ import annotations

import pytest
import torch

from mtlora_dist.models.decoders import FP32BatchNorm2d, TaskDecoder


def test_fp32_batchnorm_equals_batchnorm_in_fp32_and_tracks_the_same_statistics():
    torch.manual_seed(0)
    ours, ref = FP32BatchNorm2d(6), torch.nn.BatchNorm2d(6)
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    for module in (ours, ref):
        module.train()
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_fp32_batchnorm_accepts_bf16_parameters_with_fp32_statistics():
    bn = FP32BatchNorm2d(3)
    bn.weight.data = bn.weight.data.bfloat16()  # what DeepSpeed bf16 does: parameters cast, buffers not
    bn.bias.data = bn.bias.data.bfloat16()
    x = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    out = bn(x)
    assert out.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    out.float().sum().backward()
    assert bn.weight.grad is not None and torch.isfinite(x.grad.float()).all()


def _literal_head(decoder, features):
    """Spec B §3 as written: reducers, resize to the finest scale, concatenate, conv -> BN -> ReLU -> conv."""
    maps = [torch.nn.functional.conv2d(f.permute(0, 3, 1, 2), r.weight) for f, r in zip(features, decoder.reducers)]
    size = maps[0].shape[-2:]
    maps = [maps[0]] + [
        torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]
    ]
    return decoder.head.classifier(decoder.head.fuse(torch.cat(maps, dim=1)))


@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])
def test_decoder_equals_the_literal_resize_concat_conv_head(grid):
    """The head applies its fuse conv before resizing (they commute); outputs and gradients must not change."""
    torch.manual_seed(0)
    dims, channels = [16, 32, 64, 64], [4, 6, 8, 10]
    sizes = [grid, (grid[0] // 2, grid[1] // 2), (grid[0] // 4, grid[1] // 4), (grid[0] // 4, grid[1] // 4)]
    decoder = TaskDecoder(dims, channels, hidden_channels=24, num_outputs=5).train()
    feats = [torch.randn(2, *hw, d, requires_grad=True) for d, hw in zip(dims, sizes)]
    ours = decoder(feats)
    grads_ours = torch.autograd.grad(ours.square().sum(), feats + list(decoder.parameters()))
    literal = _literal_head(decoder, feats)
    grads_literal = torch.autograd.grad(literal.square().sum(), feats + list(decoder.parameters()))
    assert ours.shape == (2, 5, *grid) and ours.is_contiguous()
    torch.testing.assert_close(ours, literal, rtol=1e-4, atol=1e-5)  # fp32: only the summation order differs
    for g_ours, g_literal in zip(grads_ours, grads_literal):  # the fuse bias, before a BN, has a ~0 gradient
        torch.testing.assert_close(g_ours, g_literal, rtol=1e-4, atol=1e-4)
