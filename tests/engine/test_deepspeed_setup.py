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
