"""The training step keeps losses on the device: around real DeepSpeed steps (ZeRO-2 bf16, and the
offload config) our code reads nothing back to the host per step, and one read per log step.

DeepSpeed's own reads are counted apart and printed (``pytest -s``); docs/gpu.md names them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from host_reads import count_host_reads, deepspeeds, ours

from mtlora_dist.engine import trainer

WORKER = Path(__file__).with_name("host_sync_worker.py")


def _reads(tmp_path: Path, deepspeed: str, *overrides: str) -> dict:
    out = tmp_path / f"{deepspeed}.json"
    cmd = [sys.executable, str(WORKER), "--deepspeed", deepspeed, "--out", str(out), *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.integration
@pytest.mark.parametrize(
    "deepspeed,overrides",
    [("zero2", ["deepspeed.precision=bf16"]), ("zero2_offload", [])],
    ids=["zero2-bf16", "offload"],
)
def test_real_deepspeed_steps_read_nothing_of_ours_back_to_the_host(tmp_path, deepspeed, overrides):
    report = _reads(tmp_path, deepspeed, *overrides)
    counts = report["counts"]
    assert report["global_steps"] == 1 + report["steps"], "the counted steps were optimizer steps"
    assert ours(counts) == {}, f"host reads of ours in {report['steps']} steps: {ours(counts)}"
    assert counts.keys() == deepspeeds(counts).keys(), f"reads of no known owner: {counts}"
    assert report["log"] == {"tolist mtlora_dist/engine/trainer.py:_host_values": 1}
    per_step = {k: v / report["steps"] for k, v in sorted(counts.items())}
    print(f"\nDeepSpeed's host reads per step ({deepspeed}, 2 micro-batches):", json.dumps(per_step, indent=1))


def test_log_values_are_the_losses_in_one_read():
    losses = {"loss": torch.tensor(3.0), "semseg": torch.tensor(2.0), "sal": torch.tensor([1.0])}
    with count_host_reads() as counts:
        values = trainer._host_values(losses)
    assert dict(counts) == {"tolist mtlora_dist/engine/trainer.py:_host_values": 1}
    assert values == {"loss": 3.0, "semseg": 2.0, "sal": 1.0}


def test_the_counter_sees_and_attributes_reads():
    x = torch.ones(2)
    with count_host_reads() as counts:
        x.sum().item(), bool(x.all()), x.tolist()
    assert dict(counts) == {f"{name} test_train_step.py:test_the_counter_sees_and_attributes_reads": 1
                            for name in ("item", "__bool__", "tolist")}  # fmt: skip
