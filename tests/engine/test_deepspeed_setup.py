"""The DeepSpeed set-up's version guard."""

from __future__ import annotations

import logging

import pytest

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


def test_auto_precision_is_bf16_on_a_gpu_that_has_it_and_fp32_on_a_cpu(monkeypatch):
    import torch

    from mtlora_dist.config import DeepSpeedSettings
    from mtlora_dist.engine.deepspeed_setup import deepspeed_config, model_dtype, resolve_precision

    auto = DeepSpeedSettings(precision="auto")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"  # an explicit choice stays
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_dtype(auto) is torch.float32 and not deepspeed_config(auto, 2, 1)["bf16"]["enabled"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert model_dtype(auto) is torch.bfloat16 and deepspeed_config(auto, 2, 1)["bf16"]["enabled"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto") == "fp32"  # no bf16 on the GPU: fp32, never silently fp16
