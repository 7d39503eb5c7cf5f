"""Partial labels across ranks: under ZeRO-3, two ranks whose batches lack different labels (one lacks a
task entirely in some step) train without a hang and with the losses one process computes on the same
samples (tests/engine/partial_labels_worker.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runs import TINY_RUN, deepspeed_launcher

from mtlora_dist.config import data_config
from mtlora_dist.data.ingest.convert import convert

from declared_data import NAME, make_tree, write_configs

WORKER = Path(__file__).with_name("partial_labels_worker.py")
pytestmark = pytest.mark.integration


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_two_ranks_with_partial_labels_match_one_rank_on_the_same_samples(tmp_path):
    recipe = write_configs(tmp_path / "configs")
    # road missing from every 2nd sample: with 2 samples per micro-batch, some micro-batches have no road at all
    root = make_tree(tmp_path / "tree", {"train": 16}, seed=4, road_missing_every=2)
    data = data_config(str(tmp_path / "configs" / "data" / f"{NAME}.yaml"))
    shards = str(tmp_path / "shards")
    convert(NAME, str(root), "train", shards, shard_size_mb=0.02, fmt=data.format)
    overrides = [*TINY_RUN, "data.batch_size=2", f"data.train_url={shards}", f"data.val_url={shards}",
                 "deepspeed.zero_stage=3", "optim.warmup_fraction=0.0"]  # fmt: skip
    args = [str(WORKER), "--config", str(recipe), "--steps", "3", *overrides]

    _run([*deepspeed_launcher(2), *args, "--out", str(tmp_path / "two.json")], tmp_path)
    _run([sys.executable, *args, "--out", str(tmp_path / "one.json")], tmp_path)
    two = json.loads((tmp_path / "two.json").read_text())["losses"]
    one = json.loads((tmp_path / "one.json").read_text())["losses"]

    assert sorted(two) == sorted(one) == ["1", "2", "3"]
    counts = [two[s][r]["labeled/semseg+road+height"][1] for s in two for r in two[s]]
    assert 0 in counts, "the test needs a micro-batch without any road label"
    assert any(c > 0 for c in counts)
    for step in two:
        assert sorted(two[step]) == sorted(one[step]) == ["0", "1"]
        for rank in two[step]:
            a, b = two[step][rank], one[step][rank]
            assert a["labeled/semseg+road+height"] == b["labeled/semseg+road+height"], "not the same samples"
            if a["labeled/semseg+road+height"][1] == 0:
                assert a["road"] == 0.0, "a micro-batch without road labels has a zero road loss"
            for key in ("loss", "semseg", "road", "height"):
                assert math.isfinite(a[key])
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), f"step {step} rank {rank} {key}"
