"""Sweep grids: Hydra's override grammar expanded into points with stable names, presets read, every
point's config checked before anything runs, credentials refused, the CPUs split between local points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mtlora_dist.config import ConfigError
from mtlora_dist.study.grid import SweepSpec, expand, load_preset, point_name, spec_yaml
from mtlora_dist.study.runner import SweepRun

REPO = Path(__file__).resolve().parents[2]


def test_grids_are_products_united_in_order_with_stable_names():
    spec = SweepSpec(
        config="quickstart",
        overrides=["max_steps=5"],
        grids=[["adapter.shared_rank=2,4", "seed=range(0,2)"], ["data.tasks=[semseg],[sal]", "seed=0"]],
    )
    points = expand(spec)
    assert [p.name for p in points] == [
        "adapter.shared_rank-2__seed-0",
        "adapter.shared_rank-2__seed-1",
        "adapter.shared_rank-4__seed-0",
        "adapter.shared_rank-4__seed-1",
        "data.tasks-semseg__seed-0",
        "data.tasks-sal__seed-0",
    ]
    assert points[5].overrides == ("max_steps=5", "data.tasks=[sal]", "seed=0")
    assert expand(spec) == points  # the same names on every expansion: a rerun finds its folders


def test_point_names_are_safe_folder_names_and_hydra_values():
    name = point_name([("data.tasks", "[semseg,sal]"), ("run", "a/b c=d")])
    assert name == "data.tasks-semseg+sal__run-a-b-c-d"
    assert "=" not in name and "/" not in name and "," not in name


def test_duplicate_points_run_once():
    spec = SweepSpec(grids=[["seed=0,1"], ["seed=1,2"]])
    assert [p.name for p in expand(spec)] == ["seed-0", "seed-1", "seed-2"]


def test_a_credential_in_a_sweep_value_is_refused_without_echo():
    spec = SweepSpec(grids=[["data.storage.secret=abc123,def456"]])
    with pytest.raises(ConfigError) as err:
        expand(spec)
    assert "abc123" not in str(err.value) and "credential" in str(err.value)
    with pytest.raises(ConfigError):
        expand(SweepSpec(grids=[["data.train_url=s3://AKID:se/cret@bkt/x,s3://b/y"]]))


def test_presets_round_trip_and_the_demo_covers_every_method(tmp_path):
    demo = load_preset("demo")
    points = expand(demo)
    methods = {p.values.get("method") for p in points}
    assert methods >= {"mtlora", "full_ft", "decoders_only", "bitfit", "lora", "single_task"}
    assert {p.values["seed"] for p in points} == {"0", "1"}
    single = [p for p in points if p.values.get("method") == "single_task"]
    assert len(single) == 4 * 2  # one model per task and seed
    assert demo.local_jobs == 2  # two tiny points at once on a 2-core machine
    saved = tmp_path / "sweep.yaml"
    saved.write_text(spec_yaml(demo))
    again = load_preset(str(saved))
    assert [p.name for p in expand(again)] == [p.name for p in points] and again.local_jobs == 2
    (tmp_path / "bad.yaml").write_text("config: quickstart\nlocal_jobs: 0\n")
    with pytest.raises(ConfigError, match="local_jobs is 0; expected a whole number of 1 or more"):
        load_preset(str(tmp_path / "bad.yaml"))


def test_points_sharing_a_machine_split_its_cpus(monkeypatch):
    import mtlora_dist.cpus

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(mtlora_dist.cpus, "available_cpus", lambda: 16)
    run = SweepRun(SweepSpec(config="quickstart", local_jobs=4), "/tmp/s", [], ranks=2)
    assert run.local_threads() == 2 and run.job(expand(run.spec)[0], 2).threads == 2
    assert SweepRun(SweepSpec(config="quickstart"), "/tmp/s", []).local_threads() is None  # its own budget
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert run.local_threads() is None  # set by the user: it wins


def test_a_bad_key_in_any_point_is_one_line_and_exit_2_before_anything_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "sweep.py"), "--sweep-dir", str(tmp_path / "s"), "--list",
         "seed=0,1", "--grid", "optim.base_lrr=1e-3,2e-3"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "optim.base_lrr" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()
