"""One real training run shared by the evaluation, export and report tests: the trainer (DeepSpeed ZeRO-2, one
CPU rank), the tiny model, 6 steps on synthetic shards in the test S3 server, evaluation at the last step,
run_dir on S3.

One rank: the shortest run that shows evaluation equal to the training run's (with several ranks SyncBN keeps
their BatchNorm statistics identical, so a multi-rank run would agree too, at more cost)."""

from __future__ import annotations

import pytest

from mtlora_dist.data.ingest.convert import convert
from mtlora_dist.synthetic.datasets import generate

from evaltest_utils import CONFIG, TINY, TrainedRun, run_script


@pytest.fixture(scope="session")
def trained_run(s3_server, tmp_path_factory) -> TrainedRun:
    root = tmp_path_factory.mktemp("eval-synthetic")
    generate("pascal_context", str(root), num_train=16, num_val=6, seed=5)
    s3_server.make_bucket("eval-data")
    for split in ("train", "val"):
        convert("pascal_context", str(root), split, f"s3://eval-data/{split}", shard_size_mb=0.2)
    s3_server.make_bucket("eval-runs")
    overrides = TINY + ["data.train_url=s3://eval-data/train", "data.val_url=s3://eval-data/val"]
    run = TrainedRun("s3://eval-runs/tiny", overrides, tmp_path_factory.mktemp("eval-work"))
    run_script("train.py", ["--config", CONFIG, *overrides, f"run_dir={run.run_dir}"], run.workdir)
    return run
