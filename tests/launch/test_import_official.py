"""Official MTLoRA checkpoints in (issue 27): files in exactly the official layout, written from our own model
by the inverse key mapping, go through ``launch/import_official.py`` -> ``launch/eval.py`` ->
``launch/export.py`` and the exported model's outputs equal the original model's; unsafe or mismatched files
are refused with exit status 2 and one line, and nothing from them runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from runs import QUICKSTART, REPO, TINY_RUN

from mtlora_dist.checkpoint.official import (
    OfficialCheckpointError,
    from_official,
    official_key,
    our_key,
    read_official,
    to_official,
)
from mtlora_dist.config import load_config
from mtlora_dist.data.ingest.convert import convert
from mtlora_dist.data.stream.batch import normalize_image
from mtlora_dist.engine.rng import seed_everything
from mtlora_dist.export import load
from mtlora_dist.export.merge import output_difference
from mtlora_dist.models import build_model
from mtlora_dist.synthetic.datasets import generate

from factories import make_loader, randomize_lora

OVERRIDES = [*TINY_RUN, "optim.warmup_fraction=0.2"]
TASKS = ["semseg", "human_parts", "sal", "normals"]


@pytest.fixture
def yacs_module(monkeypatch):
    """A ``yacs.config.CfgNode`` as the official code pickles it (a dict with attribute flags): yacs is not
    installed here, so a stand-in module is registered while the official files are written."""

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module = types.ModuleType("yacs.config")
    module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return CfgNode


def _node(cls, data: dict):
    node = cls({k: _node(cls, v) if isinstance(v, dict) else v for k, v in data.items()})
    node.__dict__["__immutable__"] = True  # yacs keeps its flags in the instance dict: pickled as BUILD state
    return node


def official_config(cls, shared_rank=8, task_rank=4, tasks=TASKS, scale=4.0):
    return _node(
        cls,
        {
            "TASKS": list(tasks),
            "MODEL": {
                "MTLORA": {
                    "ENABLED": True,
                    "R": [shared_rank] * 4,
                    "R_PER_TASK": {t: [task_rank] for t in tasks},
                    "SHARED_SCALE": [scale],
                    "TASK_SCALE": [scale],
                }
            },
            "TRAIN": {"EPOCHS": 300, "WARMUP_EPOCHS": 20},
        },
    )


def our_model(overrides: list[str] = (), seed: int = 3):
    """The tiny recipe's model with every weight trained-looking: LoRA, decoders and the frozen backbone
    moved away from what ``seed`` builds, so only the imported file can reproduce them."""
    cfg = load_config(QUICKSTART, [*OVERRIDES, *overrides])
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    randomize_lora(model, seed=seed, batchnorm=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return model.eval()


def write_official(path: Path, model, config, module_prefix: bool = False, **extra) -> Path:
    state = to_official(model)
    if module_prefix:
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(
        {
            "model": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "weight_decay": 0.05, "params": [0, 1]}]},
            "lr_scheduler": {"t_initial": 280, "warmup_t": 20},
            "max_accuracy": 0.0,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "epoch": 299,
            "config": config,
            **extra,
        },
        path,
    )
    return path


def run_cli(script: str, args: list[str], cwd: Path, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "launch" / script), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def refused(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# -- the mapping, in process ---------------------------------------------------------------------------------
def test_the_key_mapping_follows_the_issue_rules():
    assert our_key("backbone.layers.0.downsample.reduction.weight") == "backbone.layers.1.downsample.reduction.weight"
    assert our_key("backbone.layers.2.blocks.1.attn.qkv.linear.weight") == "backbone.layers.2.blocks.1.attn.qkv.weight"
    assert our_key("downsampler.sal.downsample_3.weight") == "decoders.sal.reducers.3.weight"
    assert our_key("decoders.decoders.semseg.last_layer.3.bias") == "decoders.semseg.head.classifier.bias"
    assert our_key("decoders.decoders.normals.last_layer.1.running_var") == "decoders.normals.head.fuse.1.running_var"
    assert our_key("backbone.patch_embed.proj.weight") == "backbone.patch_embed.proj.weight"
    for name in ("backbone.layers.3.downsample.norm.bias", "decoders.sal.head.fuse.0.weight"):
        assert our_key(official_key(name)) == name


def test_an_official_state_maps_back_onto_the_model_exactly():
    model = our_model()
    official = to_official(model)
    assert any(k.endswith(".attn.qkv.linear.weight") for k in official)
    assert any(k.endswith(".relative_position_index") for k in official)
    assert "backbone.layers.3.blocks.0.mlp.fc2.lora_shared_A" in official  # the dead adapter the official keeps
    mapped = from_official(official, model)
    own = model.state_dict()
    assert set(own) - set(mapped) == {k for k in own if k.endswith(("lora_shared_scale", "lora_task_scale"))}
    assert all(torch.equal(v, own[k]) for k, v in mapped.items())


def test_leftover_and_changed_keys_are_named():
    model = our_model()
    official = to_official(model)
    official["backbone.extra_head.weight"] = torch.zeros(1)
    del official["downsampler.sal.downsample_2.weight"]
    index = next(k for k in official if k.endswith("relative_position_index"))
    official[index] = official[index].flip(0)
    with pytest.raises(OfficialCheckpointError) as err:
        from_official(official, model)
    text = str(err.value)
    assert "backbone.extra_head.weight" in text and "decoders.sal.reducers.2.weight" in text and index in text


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("import-data")
    generate("pascal_context", str(root / "raw"), num_train=8, num_val=4, seed=7)
    for split in ("train", "val"):
        convert("pascal_context", str(root / "raw"), split, str(root / split), shard_size_mb=0.2)
    return root


@pytest.mark.integration
@pytest.mark.parametrize("module_prefix", [False, True])
def test_an_official_checkpoint_imports_evaluates_and_exports_to_the_same_outputs(
    yacs_module, shards, tmp_path, module_prefix
):
    model = our_model()
    official = write_official(tmp_path / "ckpt_epoch_299.pth", model, official_config(yacs_module), module_prefix)
    run_dir = tmp_path / "run"
    data = [f"data.train_url={shards / 'train'}", f"data.val_url={shards / 'val'}"]
    proc = run_cli(
        "import_official.py",
        ["--config", QUICKSTART, *OVERRIDES, *data, f"official={official}", f"run_dir={run_dir}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run_dir / "checkpoints" / "step_00000000" / "COMPLETE.json").exists()
    assert (run_dir / "pretrained_backbone.safetensors").exists()

    proc = run_cli("eval.py", [f"checkpoint={run_dir}", f"out={tmp_path / 'eval'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())
    assert results

    proc = run_cli("export.py", [f"checkpoint={run_dir}", f"out={tmp_path / 'export'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exported = load(str(tmp_path / "export"))
    loader = make_loader(
        str(shards / "val"), dataset="pascal_context", tasks=TASKS, split="val", img_size=(64, 64), batch_size=4
    )
    images = normalize_image(next(iter(loader))["image"])
    differences = output_difference(model, exported, images)
    assert max(differences.values()) < 1e-5, differences

    if not module_prefix:  # training continues from it, with the run's own config (its model.pretrained)
        proc = run_cli("train.py", ["--config", str(run_dir / "config.yaml"), "max_steps=2"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "resumed from step 0" in proc.stdout + proc.stderr
        assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE.json").exists()
    else:  # a second import into the same run_dir touches nothing of the run
        backbone = (run_dir / "pretrained_backbone.safetensors").read_bytes()
        again = [*OVERRIDES, "seed=9", f"official={official}", f"run_dir={run_dir}"]
        line = refused(run_cli("import_official.py", ["--config", QUICKSTART, *again], tmp_path))
        assert "already holds a run" in line
        assert (run_dir / "pretrained_backbone.safetensors").read_bytes() == backbone


def test_a_pickle_with_a_code_payload_is_refused_and_runs_nothing(yacs_module, tmp_path):
    sentinel = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    path = write_official(tmp_path / "evil.pth", our_model(), official_config(yacs_module), max_accuracy=Payload())
    proc = run_cli(
        "import_official.py",
        ["--config", QUICKSTART, *OVERRIDES, f"official={path}", f"run_dir={tmp_path / 'run'}"],
        tmp_path,
    )
    line = refused(proc)
    assert "refused to read" in line and "open" in line
    assert not sentinel.exists() and not (tmp_path / "run").exists()
    with open(path, "rb") as fh:  # the payload is real: an unrestricted unpickler runs it
        torch.load(fh, weights_only=False)
    assert sentinel.exists()


def test_a_checkpoint_of_another_adapter_rank_is_refused_naming_the_keys(yacs_module, tmp_path):
    other = our_model(["adapter.task_rank=2"])
    config = official_config(yacs_module, task_rank=2)
    config["MODEL"]["MTLORA"].pop("R_PER_TASK")  # as if the config said nothing: the shapes still tell
    path = write_official(tmp_path / "r2.pth", other, config)
    proc = run_cli(
        "import_official.py",
        ["--config", QUICKSTART, *OVERRIDES, f"official={path}", f"run_dir={tmp_path / 'run'}"],
        tmp_path,
    )
    line = refused(proc)
    assert "shapes that differ" in line and "lora_tasks_A.semseg" in line and "(2, " in line
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_whose_config_differs_is_refused_listing_the_differences(yacs_module, tmp_path):
    path = write_official(tmp_path / "c.pth", our_model(), official_config(yacs_module, scale=2.0, tasks=TASKS[:3]))
    proc = run_cli(
        "import_official.py",
        ["--config", QUICKSTART, *OVERRIDES, f"official={path}", f"run_dir={tmp_path / 'run'}"],
        tmp_path,
    )
    line = refused(proc)
    assert "MODEL.MTLORA.SHARED_SCALE" in line and "tasks:" in line


def test_read_official_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2], path)
    with pytest.raises(OfficialCheckpointError, match="not an official MTLoRA checkpoint"):
        read_official(str(path))


def test_a_backbone_other_than_the_named_pretrained_file_is_refused(yacs_module, tmp_path):
    from safetensors.torch import save_file

    other = our_model(seed=4)  # another backbone than the one in the official file
    pretrained = tmp_path / "swin.safetensors"
    backbone = {k.removeprefix("backbone."): v for k, v in other.state_dict().items() if k.startswith("backbone.")}
    save_file({k: v.contiguous() for k, v in backbone.items() if "lora_" not in k}, str(pretrained))
    path = write_official(tmp_path / "o.pth", our_model(), official_config(yacs_module))
    args = [*OVERRIDES, f"model.pretrained={pretrained}", f"official={path}", f"run_dir={tmp_path / 'run'}"]
    line = refused(run_cli("import_official.py", ["--config", QUICKSTART, *args], tmp_path))
    assert "differs from model.pretrained" in line and "layers.0.blocks.0.attn.qkv.weight" in line
    assert not (tmp_path / "run" / "checkpoints").exists()
