"""FP32SyncBatchNorm2d: two gloo ranks holding parts of a batch compute what one BatchNorm computes over
the whole batch (outputs, running statistics, gradients), in fp32 under bf16; the conversion keeps
parameters, buffers and state_dict keys."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mtlora_dist import comm
from mtlora_dist.models.decoders import FP32BatchNorm2d
from mtlora_dist.models.precision import align_buffers
from mtlora_dist.models.sync_bn import FP32SyncBatchNorm2d, convert_sync_batchnorm

from factories import tiny_model

CHANNELS = 6
SPLIT = (3, 5)  # rows per rank: unequal batches weigh by their element counts


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(sum(SPLIT), CHANNELS, 4, 5, generator=g) * 3 + 2).to(dtype)
    probe = torch.randn(sum(SPLIT), CHANNELS, 4, 5, generator=g)  # a loss that weighs every output differently
    return x, probe


def _bn(cls: type, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(1)
    bn = cls(CHANNELS, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(CHANNELS) + 0.5)
        bn.bias.copy_(torch.randn(CHANNELS))
    return bn.to(dtype).train()  # parameters in the training dtype (buffers too, until align_buffers)


def _step(bn: nn.Module, x: torch.Tensor, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    align_buffers(bn, x.dtype)
    x = x.clone().requires_grad_(True)
    out = bn(x)
    (out.float() * probe).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var}  # fmt: skip


def _rank(rank: int, port: int, dtype: torch.dtype, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, probe = _data(dtype)
    rows = slice(sum(SPLIT[:rank]), sum(SPLIT[: rank + 1]))
    result = _step(_bn(FP32SyncBatchNorm2d, dtype), x[rows], probe[rows])
    for key in ("weight_grad", "bias_grad"):  # what data parallelism does with parameter gradients
        result[key] = comm.all_reduce(result[key].float())
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_ranks_equal_one_batchnorm_over_the_whole_batch(tmp_path, dtype):
    from s3_server import free_port

    mp.start_processes(_rank, args=(free_port(), dtype, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, probe = _data(dtype)
    whole = _step(_bn(FP32BatchNorm2d, dtype), x, probe)

    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), whole["out"], **tol)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), whole["x_grad"], **tol)
    for r in ranks:
        assert r["out"].dtype == dtype and r["running_mean"].dtype == r["running_var"].dtype == torch.float32
        torch.testing.assert_close(r["running_mean"], whole["running_mean"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["running_var"], whole["running_var"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["weight_grad"], whole["weight_grad"].float(), **tol)
        torch.testing.assert_close(r["bias_grad"], whole["bias_grad"].float(), **tol)


def test_without_a_group_it_is_the_fp32_batchnorm():
    x, probe = _data(torch.bfloat16)
    synced, plain = (
        _step(_bn(FP32SyncBatchNorm2d, torch.bfloat16), x, probe),
        _step(_bn(FP32BatchNorm2d, torch.bfloat16), x, probe),
    )
    for key in synced:
        torch.testing.assert_close(synced[key], plain[key], rtol=0, atol=0)


def test_conversion_keeps_parameters_buffers_and_keys():
    model = tiny_model().eval()
    before = model.state_dict(keep_vars=True)
    norms = sum(isinstance(m, FP32BatchNorm2d) for m in model.modules())
    converted = convert_sync_batchnorm(model)
    after = converted.state_dict(keep_vars=True)
    assert converted is model and norms > 0
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before), "parameters and buffers are the same objects"
    synced = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(synced) == norms and all(type(m) is FP32SyncBatchNorm2d and not m.training for m in synced)


def test_align_buffers_recognises_the_synced_norm():
    bn = convert_sync_batchnorm(nn.Sequential(FP32BatchNorm2d(4)))[0]
    bn._buffers["running_mean"] = bn.running_mean.to(torch.bfloat16)
    bn._buffers["running_var"] = bn.running_var.to(torch.bfloat16)
    align_buffers(bn, torch.bfloat16)
    assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32


def test_other_batchnorm_kinds_are_refused_with_the_fix():
    with pytest.raises(TypeError, match="model.sync_bn=false"):
        convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(4)))
