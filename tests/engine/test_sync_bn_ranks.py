"""SyncBN on the path 2+ ranks take (tests/engine/sync_bn_worker.py, 2 CPU ranks on gloo): the trainer's
conversion, a bf16 ZeRO-2 run (buckets sized to the trainable set, fp32 gradient reduction) that trains,
an evaluation, fp32 BatchNorm statistics equal on both ranks, and unchanged state_dict keys."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from runs import deepspeed_launcher

WORKER = Path(__file__).with_name("sync_bn_worker.py")
pytestmark = pytest.mark.integration


def _run(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "report.json"
    cmd = [*deepspeed_launcher(2), str(WORKER), "--out", str(out), "--steps", "4", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_two_bf16_ranks_train_and_evaluate_with_synced_fp32_batchnorm(tmp_path):
    report = _run(tmp_path, "deepspeed.precision=bf16", "deepspeed.zero_stage=2", "optim.warmup_fraction=0.0")
    assert report["world_size"] == 2
    assert report["norm_types"] == ["FP32SyncBatchNorm2d"]
    keys, plain_keys = report["keys"]
    assert keys == plain_keys, "checkpoints of converted and unconverted models hold the same keys"

    ranks = report["stats"]
    assert ranks[0] and ranks[0].keys() == ranks[1].keys()
    for name, (mean, var, tracked) in ranks[0].items():
        other_mean, other_var, other_tracked = ranks[1][name]
        assert tracked == other_tracked == 4
        # each rank saw different samples: only the all-reduced statistics agree
        assert mean == pytest.approx(other_mean, rel=1e-6, abs=1e-7) and var == pytest.approx(other_var, rel=1e-6)
        assert any(abs(v) > 1e-4 for v in mean), f"{name}: the running mean never moved"
    statistics = {n: d for n, d in report["buffers"].items() if n.rsplit(".", 1)[-1] in ("running_mean", "running_var")}
    assert len(statistics) == 2 * len(ranks[0]), "every BatchNorm's statistics are buffers of the engine's module"
    assert all(d == "torch.float32" for d in statistics.values()), statistics
    assert all(d == "torch.bfloat16" for n, d in report["buffers"].items() if n.endswith("attn_mask"))

    losses = report["losses"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(dtype == "torch.bfloat16" and finite for dtype, finite in report["eval"].values())

    zero = report["ds_config"]["zero"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] < 500_000_000
    assert report["ds_config"]["comm"] == "torch.float32"
