"""The entry points' config handling as a user meets it: checked before torch loads, one message and exit 2
for every mistake (with what is valid), ``--help`` with the groups and keys, ``--cfg job``, and no sweeps."""

from __future__ import annotations

import shutil

import pytest
import yaml

from mtlora_dist.config import ConfigError, check_data, load_config

from cli_utils import REPO, output, run, script

# Runs the entry point in this interpreter and reports, at exit, whether torch or DeepSpeed were imported.
_IMPORT_PROBE = (
    "import atexit, os, runpy, sys; "
    "atexit.register(lambda: print('HEAVY', sorted(m for m in ('torch', 'deepspeed') if m in sys.modules), "
    "file=sys.stderr)); sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def probe(args: list[str], cwd=REPO):
    return run(["-c", _IMPORT_PROBE, *args], cwd)


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "configs/zero2.yaml"],  # a recipe without data
        ["max_steps=abc"],
        ["--cfg", "job"],
    ],
    ids=["recipe-without-data", "bad-value", "cfg-job"],
)
def test_the_config_is_checked_before_torch_and_deepspeed_load(args):
    proc = probe([script("train.py"), *args])
    assert "HEAVY []" in proc.stderr, output(proc)[-2000:]
    assert proc.returncode == (0 if "--cfg" in args else 2), output(proc)[-2000:]


def test_loading_a_config_imports_no_torch():
    code = (
        "import sys; from mtlora_dist.config import load_config, check_data, to_yaml; "
        "cfg = load_config('configs/pascal_swin_b.yaml', ['data.train_url=/a', 'data.val_url=/b']); "
        "check_data(cfg.data); to_yaml(cfg); "
        "print(sorted(m for m in ('torch', 'deepspeed', 'timm') if m in sys.modules))"
    )
    proc = run(["-c", code], REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", output(proc)


def test_a_recipe_without_data_refuses_to_start_and_names_the_keys(tmp_path):
    proc = run(
        [script("train.py"), "--config", str(REPO / "configs" / "zero2.yaml"), f"run_dir={tmp_path / 'run'}"], tmp_path
    )
    assert proc.returncode == 2, output(proc)
    assert "data.train_url and data.val_url are not set" in proc.stderr
    assert "data.train_url=s3://my-bucket/pascal_context/train" in proc.stderr  # an example to copy
    assert "Traceback" not in output(proc) and not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_only_the_synthetic_data_group_trains_without_urls():
    assert load_config(None).data.synthetic.enabled  # the quickstart
    check_data(load_config("configs/zero2.yaml", ["data=synthetic"]).data)
    with pytest.raises(ConfigError, match="data.val_url is not set"):
        check_data(load_config("configs/zero2.yaml", ["data.train_url=/shards/train"]).data)
    with pytest.raises(ConfigError, match="data.train_url and data.val_url"):
        check_data(load_config("configs/pascal_swin_t_r16.yaml").data)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["+foo=1"], ["unknown config key 'foo'", "valid keys at the top level", "'max_steps'"]),
        (["+model.foo=1"], ["unknown config key 'model.foo'", "valid keys under 'model'", "'backbone'"]),
        (
            ["adapter=mtlora_r8"],
            ["no adapter option 'mtlora_r8'", "available adapter options", "'mtlora_r16'", "'tiny'"],
        ),
        (["max_steps=abc"], ["'max_steps' expects an integer, got 'abc'"]),
        (["data.batch_size=2.5"], ["'data.batch_size' expects an integer, got '2.5'"]),
        (["logging.progress_bar=maybe"], ["expects true or false"]),
        (
            ["optimizer.base_lr=1"],
            ["unknown config key 'optimizer'", "did you mean 'optim'", "valid keys at the top level"],
        ),
        (["adapter.shared_rank=16,32"], ["sweep", "launch/sweep.py"]),
        (["-m", "adapter=mtlora_r16,mtlora_r32"], ["-m/--multirun", "own run_dir", "launch/sweep.py"]),
        (["hydra.run.dir=out"], ["not Hydra apps", "run_dir="]),
    ],
    ids=[
        "plus-key",
        "plus-nested-key",
        "group-option",
        "int-abc",
        "int-float",
        "bool",
        "section",
        "comma-sweep",
        "multirun",
        "hydra-key",
    ],
)
def test_config_mistakes_exit_2_with_what_is_valid(args, expected, tmp_path):
    proc = run([script("train.py"), *args, f"run_dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2, output(proc)
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr)
    assert "Traceback" not in output(proc) and not (tmp_path / "run").exists()


def test_open_mappings_still_take_new_keys_with_plus():
    cfg = load_config(None, ["+deepspeed.extra.wall_clock_breakdown=true", "+loss_weights.semseg=2.0"])
    assert cfg.deepspeed.extra == {"wall_clock_breakdown": True} and cfg.loss_weights == {"semseg": 2.0}


def test_a_recipe_copied_outside_configs_finds_the_package_groups(tmp_path):
    shutil.copy(REPO / "configs" / "zero2.yaml", tmp_path / "mine.yaml")
    proc = run(
        [script("train.py"), "--config", str(tmp_path / "mine.yaml"), "--cfg", "job", "adapter=mtlora_r16"], tmp_path
    )
    assert proc.returncode == 0, output(proc)
    assert yaml.safe_load(proc.stdout)["adapter"]["shared_rank"] == 16


def test_a_group_folder_beside_a_copied_recipe_wins_and_a_missing_one_is_explained(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "mine.yaml").write_text("shared_rank: 12\ntask_rank: 2\n")
    recipe = (REPO / "configs" / "zero2.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(recipe.replace("adapter: mtlora_r64", "adapter: mine"))
    cfg = load_config(str(tmp_path / "mine.yaml"))
    assert (cfg.adapter.shared_rank, cfg.adapter.task_rank) == (12, 2)
    (tmp_path / "broken.yaml").write_text(recipe.replace("logging: default", "monitoring: default"))
    with pytest.raises(ConfigError, match=r"no 'monitoring/' folder beside the file or in the package's configs/"):
        load_config(str(tmp_path / "broken.yaml"))


def test_cfg_job_prints_the_resolved_config_with_credentials_masked(tmp_path):
    marker = "MARKER-cfg-job-key-5d1f"
    proc = run(
        [script("train.py"), "--cfg", "job", "max_steps=7", "data.storage.key=${oc.env:MTLORA_TEST_KEY}"],
        tmp_path,
        env={"MTLORA_TEST_KEY": marker},
    )
    assert proc.returncode == 0, output(proc)
    printed = yaml.safe_load(proc.stdout)
    assert printed["max_steps"] == 7 and printed["data"]["storage"]["key"] == "***"
    assert marker not in output(proc) and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["train.py", "eval.py", "export.py", "params.py"])
def test_help_lists_the_config_groups_and_the_most_used_keys(name, tmp_path):
    proc = run([script(name), "--help"], tmp_path)
    assert proc.returncode == 0, output(proc)
    for text in (
        "adapter=",
        "mtlora_r16",
        "data=",
        "synthetic",
        "deepspeed=",
        "zero3",
        "model=",
        "swin_b",
        "data.train_url",
        "run_dir",
        "max_steps",
        "deepspeed.zero_stage",
        "--cfg",
        "exit status",
    ):
        assert text in proc.stdout, (name, text)


def test_eval_and_export_print_their_resolved_config(tmp_path):
    common = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--cfg", "job", "checkpoint=runs/none"]
    for name in ("eval.py", "export.py"):
        proc = run([script(name), *common, "seed=3"], tmp_path)
        assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["seed"] == 3, output(proc)


@pytest.mark.parametrize("name", ["train_swinb.sh", "train_swinl.sh"])
def test_slurm_scripts_run_directly_say_to_use_sbatch(name, tmp_path):
    env = {"SLURM_JOB_ID": ""}
    proc = run([str(REPO / "slurm" / name), "max_steps=1"], tmp_path, env=env, python=["bash"])
    assert proc.returncode == 2 and "run this through sbatch" in proc.stderr and "unbound" not in proc.stderr, output(
        proc
    )
