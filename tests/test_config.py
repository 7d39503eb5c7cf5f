"""The typed schema: choices are Enum fields checked when the config is composed (the message lists
the valid values), ranks and scales are checked for what they may hold, and code downstream trusts
the composed config (a choice compares equal to its plain string)."""

from __future__ import annotations

import json

import pytest

from mtlora_dist.adapters.config import AdapterMode
from mtlora_dist.config import ConfigError, Precision, load_config, to_yaml


@pytest.mark.parametrize(
    "key, bad, valid",
    [
        ("data.read.on_error", "ignore", "[skip, raise]"),
        ("data.eval_protocol", "paper", "[original, official]"),
        ("optim.lr_scaling", "sqrt", "[linear, none]"),
        ("deepspeed.precision", "fp8", "[fp32, bf16, fp16, auto]"),
        ("logging.wandb.mode", "cloud", "[offline, online, disabled]"),
        ("model.pyramid", "fpn", "[official, timm]"),
        ("adapter.mode", "dora", "[matrix, matrixv2, addition, add, lora_only]"),
        ("deepspeed.zero_stage", "4", "[0, 1, 2, 3]"),
    ],
)
def test_a_wrong_choice_is_refused_when_composed_with_the_valid_values(key, bad, valid):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={bad}"])
    assert key in str(err.value) and valid in str(err.value)


def test_choices_compare_and_print_as_their_strings():
    cfg = load_config(None, ["deepspeed.precision=bf16", "adapter.mode=add", "data.read.on_error=raise"])
    assert cfg.deepspeed.precision == "bf16" and cfg.deepspeed.precision is Precision.bf16
    assert f"{cfg.deepspeed.precision}" == "bf16" and json.dumps(cfg.deepspeed.precision) == '"bf16"'
    assert cfg.adapter.mode is AdapterMode.addition  # the official code's alias
    assert cfg.data.read.on_error == "raise"
    text = to_yaml(cfg)
    assert "precision: bf16" in text and "mode: addition" in text and "on_error: raise" in text


@pytest.mark.parametrize(
    "override, message",
    [
        ("adapter.shared_rank=abc", "adapter.shared_rank' is 'abc'; expected a positive integer"),
        ("adapter.shared_rank=[8,0,8,8]", "adapter.shared_rank' is [8, 0, 8, 8]"),
        ("adapter.shared_scale=true", "adapter.shared_scale' is True; expected a positive number"),
        ("adapter.task_rank={semseg:2,depth:3}", "names task(s) ['depth'] that are not trained"),
        ("adapter.task_scale={semseg:x}", "adapter.task_scale' is {'semseg': 'x'}"),
    ],
)
def test_ranks_and_scales_are_checked_when_composed(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override",
    [
        "adapter.shared_rank=[4,8,16,32]",
        "adapter.task_rank={semseg:2,sal:[1,2,3,4]}",
        "adapter.task_scale=null",
        "adapter.shared_scale=2.5",
    ],
)
def test_every_documented_rank_and_scale_form_is_accepted(override):
    load_config(None, [override])
