"""Run logging: metrics.jsonl records, wandb failures never stop a run, no credentials in saved configs."""

from __future__ import annotations

import json

from mtlora_dist.config import load_config, to_yaml
from mtlora_dist.engine.run_logger import RunLogger


class _BrokenWandb:
    def log(self, *args, **kwargs):
        raise ConnectionResetError("wandb service is gone")


def test_wandb_failure_switches_wandb_off_and_keeps_metrics(tmp_path):
    logger = RunLogger(str(tmp_path), enabled=True)
    logger._wandb = _BrokenWandb()
    logger.log({"step": 1, "split": "train", "loss": 1.5})
    assert logger._wandb is None
    logger.log({"step": 2, "split": "train", "loss": 1.25})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and lines[1]["loss"] == 1.25


def test_non_finite_values_become_null(tmp_path):
    logger = RunLogger(str(tmp_path), enabled=True)
    logger.log({"step": 3, "split": "val", "tasks": {"sal": {"mIoU": float("nan")}}})
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["tasks"]["sal"]["mIoU"] is None


def test_saved_config_masks_credentials():
    cfg = load_config(None, ["data.storage.key=AKIAEXAMPLE", "data.storage.secret=very-secret-value"])
    text = to_yaml(cfg)
    assert "very-secret-value" not in text and "AKIAEXAMPLE" not in text
    assert "secret: '***'" in text or 'secret: "***"' in text or "secret: '***'" in text.replace('"', "'")
