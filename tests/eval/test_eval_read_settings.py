"""launch/eval.py reads the shards with the run's own ``data.read`` settings, also from a run saved before
the data config had sections (its flat keys are mapped, with one line saying so)."""

from __future__ import annotations

import json

import pytest
import yaml

from mtlora_dist.data.config import RENAMED_KEYS
from mtlora_dist.storage.fs import url_to_fs

from evaltest_utils import run_script

pytestmark = pytest.mark.integration


def test_eval_of_an_old_run_honours_its_saved_cache_and_checksum_settings(trained_run, tmp_path):
    fs, base = url_to_fs(trained_run.run_dir)
    old = f"{base}-flat-keys"
    fs.copy(base, old, recursive=True)
    saved = yaml.safe_load(fs.cat_file(f"{old}/config.yaml"))
    cache = tmp_path / "shard-cache"
    saved["data"]["read"].update(cache_dir=str(cache), verify_checksums=False)
    for key, new in RENAMED_KEYS.items():  # back to the flat layout of a config.yaml from before the sections
        section, name = new.split(".")
        saved["data"][key] = saved["data"][section].pop(name)
    for section in ("order", "read", "decode"):
        if not saved["data"][section]:
            del saved["data"][section]
    fs.pipe_file(f"{old}/config.yaml", yaml.safe_dump(saved).encode())

    proc = run_script("eval.py", [f"checkpoint=s3://{old}", f"out={tmp_path / 'eval'}"], trained_run.workdir)
    output = proc.stdout + proc.stderr
    migrated = [line for line in output.splitlines() if "predates the data config sections" in line]
    assert len(migrated) == 1, output[-3000:]
    assert "data.cache_dir -> data.read.cache_dir" in migrated[0]
    assert "data.verify_checksums -> data.read.verify_checksums" in migrated[0]
    assert f"checksums off, shard cache {cache}" in output, output[-3000:]  # the val loader's settings line
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert cached, "the evaluation did not fill the run's shard cache"
    report = json.loads(next((tmp_path / "eval").glob("step_*_val_original.json")).read_text())
    assert report["step"] == 6
