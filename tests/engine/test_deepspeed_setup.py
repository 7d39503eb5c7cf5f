"""The DeepSpeed set-up: its version guard, and the JSON it writes (buckets sized to the trainable set,
fp32 gradient reduction under bf16)."""

from __future__ import annotations

import logging

import pytest

from mtlora_dist.data.config import BatchGeometry
from mtlora_dist.engine.deepspeed_setup import TESTED_DEEPSPEED, check_deepspeed_version


@pytest.mark.parametrize(
    "version,inside", [("0.18.0", True), ("0.19.8", True), ("0.17.6", False), ("0.16.0", False), ("0.20.0", False)]
)
def test_versions_outside_the_tested_range_warn(version, inside, caplog):
    with caplog.at_level(logging.WARNING, logger="mtlora_dist"):
        assert check_deepspeed_version(version) is inside
    assert bool(caplog.records) is not inside
    if not inside:
        assert f">={TESTED_DEEPSPEED[0]},<{TESTED_DEEPSPEED[1]}" in caplog.text


def test_the_guard_and_pyproject_pin_the_same_range():
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"deepspeed>={TESTED_DEEPSPEED[0]},<{TESTED_DEEPSPEED[1]}"' in pyproject


# -- buckets and gradient dtypes -----------------------------------------------------------------------
def _zero(stage: int = 2, trainable: int = 8_098_874, parameters: int | None = None, **settings) -> dict:
    from mtlora_dist.config import DeepSpeedSettings
    from mtlora_dist.engine.deepspeed_setup import deepspeed_config

    config = deepspeed_config(
        DeepSpeedSettings(zero_stage=stage, **settings), BatchGeometry(2, 1, 2), trainable, parameters
    )
    return config


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_buckets_follow_the_trainable_count(stage):
    from mtlora_dist.engine.deepspeed_setup import BUCKETS_PER_SET, MAX_BUCKET, MIN_BUCKET

    sizes = {}
    for trainable in (287_067, 8_098_874, 40_000_000, 4_000_000_000):
        zero = _zero(stage, trainable)["zero_optimization"]
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"]
        sizes[trainable] = zero["reduce_bucket_size"]
    assert sizes[287_067] == MIN_BUCKET  # a tiny set: one bucket of the floor, not DeepSpeed's 5e8
    for trainable in (8_098_874, 40_000_000):  # several buckets, so reduction overlaps the backward
        assert sizes[trainable] % 1024 == 0
        assert BUCKETS_PER_SET - 1 < trainable / sizes[trainable] <= BUCKETS_PER_SET
    assert sizes[4_000_000_000] == MAX_BUCKET
    assert sizes[287_067] < sizes[8_098_874] < sizes[40_000_000] < sizes[4_000_000_000]


def test_zero3_prefetch_follows_all_parameters_and_zero0_has_no_buckets():
    from mtlora_dist.engine.deepspeed_setup import bucket_elements

    zero3 = _zero(3, 8_098_874, 34_017_146)["zero_optimization"]
    assert zero3["stage3_prefetch_bucket_size"] == bucket_elements(34_017_146) > zero3["reduce_bucket_size"]
    assert set(_zero(0)["zero_optimization"]) == {"stage"}


def test_bucket_size_and_extra_override_the_rule():
    assert _zero(2, bucket_size=3_000_000)["zero_optimization"]["reduce_bucket_size"] == 3_000_000
    zero = _zero(2, extra={"zero_optimization": {"allgather_bucket_size": 7_000_000}})["zero_optimization"]
    assert zero["allgather_bucket_size"] == 7_000_000 and zero["reduce_bucket_size"] != 7_000_000
    assert _zero(2, overlap_comm=False)["zero_optimization"]["overlap_comm"] is False


@pytest.mark.parametrize("stage,accumulate", [(0, False), (1, False), (2, True), (3, True)])
def test_bf16_reduces_gradients_in_fp32(stage, accumulate):
    config = _zero(stage, precision="bf16")
    assert config["communication_data_type"] == "fp32"
    assert ("data_types" in config) is accumulate
    if accumulate:
        assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    off = _zero(stage, precision="bf16", fp32_grad_reduce=False)
    assert "communication_data_type" not in off and "data_types" not in off
    assert "communication_data_type" not in _zero(stage, precision="fp32")


@pytest.mark.parametrize(
    "override,message",
    [("deepspeed.bucket_size=-1", "deepspeed.bucket_size is -1"),
     ("deepspeed.bucket_size=1000001", "positive even number"),
     ("deepspeed.process_group_timeout_s=0", "deepspeed.process_group_timeout_s is 0")],
)  # fmt: skip
def test_bad_bucket_or_timeout_is_refused_by_name(override, message):
    from mtlora_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_auto_precision_is_bf16_on_a_gpu_that_has_it_and_fp32_on_a_cpu(monkeypatch):
    import torch

    from mtlora_dist.config import DeepSpeedSettings
    from mtlora_dist.engine.deepspeed_setup import deepspeed_config, model_dtype, resolve_precision

    auto = DeepSpeedSettings(precision="auto")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"  # an explicit choice stays
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (
        model_dtype(auto) is torch.float32
        and not deepspeed_config(auto, BatchGeometry(2), 1_000_000)["bf16"]["enabled"]
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert (
        model_dtype(auto) is torch.bfloat16 and deepspeed_config(auto, BatchGeometry(2), 1_000_000)["bf16"]["enabled"]
    )
    assert (
        deepspeed_config(auto, BatchGeometry(2), 1_000_000)["communication_data_type"] == "fp32"
    )  # auto -> bf16 reduces in fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto") == "fp32"  # no bf16 on the GPU: fp32, never silently fp16
