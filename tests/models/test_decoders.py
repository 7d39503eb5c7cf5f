"""Decoder pieces: the fp32 BatchNorm used in the heads."""

from __future__ import annotations

import torch

from mtlora_dist.models.decoders import FP32BatchNorm2d


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
