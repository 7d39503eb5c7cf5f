"""The data config's sections and the two runtime objects the loader is built from: each section reaches
the part that uses it, the global batch has one source, old flat keys are refused (or mapped in a saved
run config) in one line."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtlora_dist.config import ConfigError, load_config, run_config
from mtlora_dist.data.config import (
    RENAMED_KEYS,
    BatchGeometry,
    DataConfig,
    DataWorld,
    DecodeConfig,
    OrderConfig,
    ReadConfig,
)
from mtlora_dist.data.stream.loader import build_loader

from datatest_utils import PASCAL_TASKS

REPO = Path(__file__).resolve().parents[2]


def test_the_loader_hands_each_section_whole_to_its_part(pascal_shards, tmp_path):
    data = DataConfig(
        dataset="pascal_context",
        tasks=PASCAL_TASKS,
        eval_batch_size=5,
        order=OrderConfig(shuffle_buffer=4, sample_log=str(tmp_path / "keys")),
        read=ReadConfig(verify_checksums=False, on_error="raise", prefetch_samples=3, buffer_mb=7),
        decode=DecodeConfig(jpeg="pil", resampler="torch"),
    )
    world = DataWorld(rank=1, world_size=2, num_workers=0, device="cpu")
    geometry = BatchGeometry(micro_batch=2, accumulation=3, world_size=2)
    train = build_loader(pascal_shards["train"], "train", data, world, geometry, img_size=(48, 64), seed=3)
    assert train.cfg.order is data.order and train.cfg.read is data.read and train.cfg.decode is data.decode
    assert train.global_batch == geometry.global_batch == 12 and len(train) == 3 * (24 // 12)
    reader = train.cfg.reader_config()
    assert (reader.verify_checksums, reader.on_error, reader.prefetch_samples) == (False, "raise", 3)
    assert reader.buffer_bytes == 7 * 2**20 and train.cfg.decoders.jpeg == "pil"
    assert train.cfg.resampling.backend == "torch" and train.sample_log == data.order.sample_log
    plan = train._dataloader().dataset.plan(0)  # the plan read the geometry: rank 1's micro-batches of 2
    assert plan.batch_sizes == [2] * len(train)
    val = build_loader(pascal_shards["val"], "val", data, world, geometry, img_size=(48, 64))
    assert val.geometry == BatchGeometry(5, 1, 2) and val.sample_log is None
    with pytest.raises(ValueError, match="geometry is for 4 rank"):
        build_loader(pascal_shards["val"], "val", data, world, BatchGeometry(2, 1, 4), img_size=(8, 8))


def test_the_engine_reads_the_global_batch_from_the_geometry():
    from mtlora_dist.config import DeepSpeedSettings
    from mtlora_dist.engine.deepspeed_setup import deepspeed_config

    config = deepspeed_config(DeepSpeedSettings(gradient_accumulation_steps=1), BatchGeometry(3, 2, 4), 10**6)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (3, 2)
    assert config["train_batch_size"] == BatchGeometry(3, 2, 4).global_batch == 24


def test_sections_check_their_values():
    with pytest.raises(ValueError, match="data.decode.jpeg is 'turbo'"):
        DecodeConfig(jpeg="turbo")
    with pytest.raises(ValueError, match="cache_max_gb must be > 0"):
        ReadConfig(cache_dir="/c", cache_max_gb=0)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        OrderConfig(shuffle_buffer=0)
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        DataWorld(rank=2, world_size=2)
    with pytest.raises(ConfigError, match="data.read.buffer_mb"):
        load_config(None, ["data.read.buffer_mb=0"])


@pytest.mark.parametrize("old", sorted(RENAMED_KEYS))
def test_an_old_flat_key_is_refused_naming_the_new_one(old):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.{old}=1"])
    assert str(err.value) == (
        f"config key 'data.{old}' is now 'data.{RENAMED_KEYS[old]}' (the data config has sections: "
        f"docs/data.md); use data.{RENAMED_KEYS[old]}"
    )


def test_the_entry_point_refuses_an_old_key_in_one_line_with_exit_2(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("defaults:\n  - mtlora_schema\n  - _self_\ndata:\n  cache_dir: /scratch/shards\n")
    for args in (["data.verify_checksums=false"], ["--config", str(recipe)]):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args, "--cfg", "job"],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
        assert "is now 'data.read." in lines[0]


def test_a_saved_run_config_with_old_keys_is_mapped_with_one_line(tmp_path, caplog):
    saved = yaml.safe_load(Path(load_config.__globals__["PACKAGE_CONFIGS"], "quickstart.yaml").read_text())
    saved.pop("defaults")
    saved["data"] = {"verify_checksums": False, "cache_dir": str(tmp_path / "cache"), "on_error": "raise",
                     "shuffle_block": 4, "augment_device": "worker"}  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with caplog.at_level(logging.WARNING, logger="mtlora_dist"):
        cfg = run_config(str(run))
    read = cfg.data.read
    assert (read.verify_checksums, read.cache_dir, read.on_error) == (False, str(tmp_path / "cache"), "raise")
    assert not hasattr(cfg.data.order, "shuffle_block")  # the block order's settings went with it: dropped
    lines = [r.getMessage() for r in caplog.records if "predates the data config sections" in r.getMessage()]
    assert len(lines) == 1 and "data.verify_checksums -> data.read.verify_checksums" in lines[0]
    assert yaml.safe_load((run / "config.yaml").read_text()) == saved  # the run's own file is left as it was
