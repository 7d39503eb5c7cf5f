"""launch/eval.py on a real trained checkpoint in S3: the training run's last evaluation, reproduced."""

from __future__ import annotations

import json
import math

import pytest

from mtlora_dist.checkpoint import CheckpointMismatchError
from mtlora_dist.config import load_config, run_config
from mtlora_dist.engine.restore import resolve_checkpoint, restore_model
from mtlora_dist.storage.fs import url_to_fs

from evaltest_utils import CONFIG, read_jsonl, run_script

pytestmark = pytest.mark.integration


def _last_val_record(run_dir: str) -> dict:
    return [r for r in read_jsonl(f"{run_dir}/metrics.jsonl") if r.get("split") == "val"][-1]


def test_eval_of_an_s3_run_dir_equals_the_training_runs_last_evaluation(trained_run):
    # the run's own config (no --config), one rank and the eval batch size as in training, default out:
    # <run_dir>/eval on S3. Same model, same batches: the same numbers, bit for bit.
    proc = run_script("eval.py", [f"checkpoint={trained_run.run_dir}"], trained_run.workdir)
    assert "delta-m" in proc.stdout + proc.stderr
    fs, base = url_to_fs(f"{trained_run.run_dir}/eval")
    report = json.loads(fs.cat_file(f"{base}/step_00000006_val_original.json"))
    assert report["step"] == 6 and report["world_size"] == 1 and report["protocol"] == "original"

    trained = _last_val_record(trained_run.run_dir)
    assert trained["step"] == 6
    for task, metrics in trained["tasks"].items():
        assert report["tasks"][task]["metrics"] == metrics, f"{task}: eval differs from the training run"
    assert report["delta_m"] == trained["delta_m"]

    markdown = fs.cat_file(f"{base}/step_00000006_val_original.md").decode()
    assert "| semseg | **mIoU** | higher |" in markdown and "Δm" in markdown
    assert fs.exists(f"{base}/curves.png") and fs.exists(f"{base}/predictions_step_00000006.png")


def test_eval_of_a_step_folder_on_two_ranks_with_the_official_protocol(trained_run, tmp_path):
    checkpoint = f"{trained_run.run_dir}/checkpoints/step_00000006"
    out = tmp_path / "eval"
    run_script(
        "eval.py",
        [
            "--config",
            CONFIG,
            *trained_run.overrides,
            f"checkpoint={checkpoint}",
            "data.eval_protocol=official",
            f"out={out}",
        ],
        trained_run.workdir,
        ranks=2,
    )
    report = json.loads((out / "step_00000006_val_official.json").read_text())
    assert report["protocol"] == "official" and report["world_size"] == 2
    assert report["checkpoint"] == checkpoint
    for task in ("semseg", "human_parts", "sal", "normals"):
        primary = report["tasks"][task]["primary_metric"]
        assert math.isfinite(report["tasks"][task]["metrics"][primary])
    assert "**Δm:" in (out / "step_00000006_val_official.md").read_text()
    assert {p.name for p in out.iterdir()} >= {"curves.png", "predictions_step_00000006.png"}


def test_a_checkpoint_of_another_model_is_a_clear_error(trained_run):
    ref = resolve_checkpoint(trained_run.run_dir)
    other_rank = load_config(CONFIG, trained_run.overrides + ["adapter.task_rank=2"])
    with pytest.raises(CheckpointMismatchError, match="shape mismatches: .*lora_tasks_A"):
        restore_model(other_rank, ref)
    other_mode = load_config(CONFIG, trained_run.overrides + ["adapter.mode=matrixv2"])
    with pytest.raises(CheckpointMismatchError, match="adapter_mode: checkpoint 'matrix' vs this run 'matrixv2'"):
        restore_model(other_mode, ref)
    other_seed = load_config(CONFIG, trained_run.overrides + ["seed=1"])  # another random frozen backbone
    with pytest.raises(CheckpointMismatchError, match="frozen backbone"):
        restore_model(other_seed, ref)


def test_checkpoint_resolution_and_the_runs_saved_config(trained_run):
    by_run = resolve_checkpoint(trained_run.run_dir)
    by_folder = resolve_checkpoint(f"{trained_run.run_dir}/checkpoints/step_00000006/")
    assert by_run.url == by_folder.url == f"{trained_run.run_dir}/checkpoints/step_00000006"
    assert by_run.step == 6 and by_run.run_dir == trained_run.run_dir
    cfg = run_config(trained_run.run_dir, None, ["data.eval_protocol=official"])
    assert cfg.model.img_size == [64, 64] and cfg.data.eval_protocol == "official"
    with pytest.raises(Exception, match="no complete checkpoint"):
        resolve_checkpoint("s3://eval-runs/nothing-here")
