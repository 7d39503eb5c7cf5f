"""Official MTLoRA checkpoints in (issue 27): files in exactly the official layout, written from our own model
by the inverse key mapping, go through ``launch/import_official.py`` -> ``launch/eval.py`` ->
``launch/export.py`` and the exported model's outputs equal the original model's; unsafe or mismatched files
are refused with exit status 2 and one line, and nothing from them runs."""

from __future__ import annotations

import copy
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
    recipe_differences,
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


def official_config(cls, shared_rank=8, task_rank=4, tasks=TASKS, scale=4.0, mtlora=None, **sections):
    """The yacs config the official ``main.py`` pickles into its checkpoints, after its ``update_config``
    normalised the MTLoRA keys (per-stage lists, ``R_PER_TASK`` with ``shared``, ``SCALE_PER_TASK`` filled),
    for the tiny recipe's model; ``mtlora`` and ``sections`` (``DATA={...}`` etc.) change entries."""
    stages = lambda value: [value] * 4  # noqa: E731
    settings = {
        "ENABLED": True,
        "BIAS": "none",
        "R": stages(shared_rank),
        "SHARED_SCALE": stages(scale),
        "TASK_SCALE": stages(scale),
        "DROPOUT": stages(0.0),
        "TRAINABLE_SCALE_SHARED": False,
        "TRAINABLE_SCALE_PER_TASK": False,
        "INTERMEDIATE_SPECIALIZATION": False,
        "FREEZE_PRETRAINED": True,
        "SPLIT_QKV": False,
        "R_PER_TASK": {**{t: stages(task_rank) for t in tasks}, "shared": stages(shared_rank)},
        "SCALE_PER_TASK": {t: stages(scale) for t in tasks},
        "SHARED_MODE": "matrix",
        "QKV_ENABLED": True,
        "PROJ_ENABLED": True,
        "FC1_ENABLED": True,
        "FC2_ENABLED": True,
        "DOWNSAMPLER_ENABLED": False,
    }
    settings.update(mtlora or {})
    swin = {"PATCH_SIZE": 4, "EMBED_DIM": 24, "DEPTHS": [1, 1, 2, 1], "NUM_HEADS": [1, 2, 2, 4], "WINDOW_SIZE": 2,
            "MLP_RATIO": 4.0}  # fmt: skip
    config = {
        "TASKS": list(tasks),
        "DATA": {"IMG_SIZE": 64, "BATCH_SIZE": 4},
        "MODEL": {
            "TYPE": "swin",
            "NAME": "tiny",
            "SWIN": swin,
            "DECODER_CHANNELS": [8, 16, 16, 32],
            "MTLORA": settings,
        },
        "TRAIN": {
            "EPOCHS": 300,
            "WARMUP_EPOCHS": 20,
            "FREEZE_PATCH_EMBED": False,
            "FREEZE_LAYER_NORM": False,
            "FREEZE_RELATIVE_POSITION_BIAS": False,
            "FREEZE_DOWNSAMPLE_REDUCTION": False,
        },  # fmt: skip
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return _node(cls, config)


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
    group = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # a test's own process group
    env = {k: v for k, v in os.environ.items() if k not in group}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "launch" / script), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def cli_refusal(args: list[str], capsys, monkeypatch) -> str:
    """``launch/import_official.py --config QUICKSTART <args>`` run in this process (its refusals come before
    anything distributed, and a fresh interpreter costs ~20 s here): exit status 2 and one ``error:`` line."""
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "launch"))
    spec = importlib.util.spec_from_file_location("import_official_cli", REPO / "launch" / "import_official.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--config", QUICKSTART, *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


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


def test_the_official_layout_lists_keys_in_the_official_registration_order():
    """The official optimizer state is indexed by the official model's parameter order: ``to_official`` writes
    it (MTLoRALinear: shared A, B, then linear, then task dicts in TASKS order; PatchMerging: reduction before
    norm; MultiTaskSwin: backbone, downsampler, decoders)."""
    keys = list(to_official(our_model()))
    at = {k: i for i, k in enumerate(keys)}
    proj = "backbone.layers.0.blocks.0.attn.proj."
    names = ["lora_shared_A", "lora_shared_B", "linear.weight", "linear.bias"]
    names += [f"lora_tasks_A.{t}" for t in TASKS] + [f"lora_tasks_B.{t}" for t in TASKS]
    assert [at[proj + n] for n in names] == sorted(at[proj + n] for n in names)
    merge = "backbone.layers.0.downsample."
    assert at[merge + "reduction.weight"] < at[merge + "norm.weight"] < at["backbone.layers.1.blocks.0.norm1.weight"]
    assert at["backbone.patch_embed.proj.weight"] < at["backbone.patch_embed.norm.weight"]
    heads = [k for k in keys if not k.startswith("backbone.")]
    assert all(k.startswith("downsampler.") for k in heads[: 4 * len(TASKS)])
    assert [k.split(".")[1] for k in heads[: 4 * len(TASKS) : 4]] == TASKS


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
    ema = {"model_ema": to_official(model)} if module_prefix else {}  # an EMA copy: named, not taken silently
    official = write_official(
        tmp_path / "ckpt_epoch_299.pth", model, official_config(yacs_module), module_prefix, **ema
    )
    run_dir = tmp_path / "run"
    data = [f"data.train_url={shards / 'train'}", f"data.val_url={shards / 'val'}"]
    proc = run_cli(
        "import_official.py",
        ["--config", QUICKSTART, *OVERRIDES, *data, f"official={official}", f"run_dir={run_dir}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ("under 'model_ema'" in proc.stderr and "weights=model_ema" in proc.stderr) == module_prefix
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
    assert "refused to read" in line and "open" in line and "weights_only" not in line
    assert not sentinel.exists() and not (tmp_path / "run").exists()
    with open(path, "rb") as fh:  # the payload is real: an unrestricted unpickler runs it
        torch.load(fh, weights_only=False)
    assert sentinel.exists()


def test_a_checkpoint_of_another_adapter_rank_is_refused_naming_the_keys(yacs_module, tmp_path):
    other = our_model(["adapter.task_rank=2"])
    config = official_config(yacs_module, task_rank=2)
    for key in ("R_PER_TASK", "R"):  # as if the config said nothing of ranks: the shapes still tell
        config["MODEL"]["MTLORA"].pop(key)
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
    assert "MODEL.MTLORA.SHARED_SCALE" in line and "TASKS:" in line


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


# -- issue 33: every recorded MTLoRA setting compared (item 7), the official task scale (8) ----------------
def _recipe(overrides: list[str] = ()):
    cfg = load_config(QUICKSTART, [*OVERRIDES, *overrides])
    seed_everything(cfg.seed)
    return cfg, build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)


@pytest.fixture(scope="module")
def tiny_recipe():
    return _recipe()


def test_the_official_config_of_the_same_recipe_has_no_differences(yacs_module, tiny_recipe):
    cfg, model = tiny_recipe
    assert recipe_differences(_plain_config(official_config(yacs_module)), cfg, model) == []


def _plain_config(node) -> dict:
    """What ``read_official`` hands on: the pickled CfgNode as plain dicts and lists."""
    return json.loads(json.dumps(node))


@pytest.mark.parametrize(
    "mtlora,sections,named",
    [
        ({"SHARED_MODE": "matrixv2"}, {}, "MODEL.MTLORA.SHARED_MODE: 'matrixv2' in the file, adapter.mode='matrix'"),
        ({"SHARED_MODE": "add"}, {}, "MODEL.MTLORA.SHARED_MODE: 'addition'"),
        ({"R": [8, 8, 8, 16], "R_PER_TASK": {t: [4] for t in TASKS}}, {}, "MODEL.MTLORA.R: [8, 8, 8, 16]"),
        (
            {"R_PER_TASK": {**{t: [4] for t in TASKS}, "sal": [4, 4, 2, 4], "shared": [8]}},
            {},
            "MODEL.MTLORA.R_PER_TASK.sal: [4, 4, 2, 4]",
        ),
        (
            {"SCALE_PER_TASK": {**{t: [4.0] for t in TASKS}, "normals": [1.0]}},
            {},
            "MODEL.MTLORA.SCALE_PER_TASK.normals (task scale of normals): [1.0]",
        ),
        (
            {"DROPOUT": [0.05] * 4},
            {},
            "MODEL.MTLORA.DROPOUT: [0.05, 0.05, 0.05, 0.05] in the file, adapter.dropout=0.0",
        ),
        ({"TRAINABLE_SCALE_SHARED": True}, {}, "MODEL.MTLORA.TRAINABLE_SCALE_SHARED: True"),
        ({"TRAINABLE_SCALE_PER_TASK": True}, {}, "MODEL.MTLORA.TRAINABLE_SCALE_PER_TASK: True"),
        ({"QKV_ENABLED": False}, {}, "shared (TA) adapter targets"),
        ({"INTERMEDIATE_SPECIALIZATION": True}, {}, "task (TS) adapter targets"),
        ({"DOWNSAMPLER_ENABLED": True}, {}, "DOWNSAMPLER_ENABLED=True"),
        ({"BIAS": "all"}, {}, "MODEL.MTLORA.BIAS: 'all'"),
        ({}, {"DATA": {"IMG_SIZE": 96}}, "DATA.IMG_SIZE: 96 in the file, model.img_size=[64, 64]"),
        ({}, {"MODEL": {"SWIN": {"EMBED_DIM": 96}}}, "MODEL.SWIN.EMBED_DIM: 96 in the file, 24"),
        ({}, {"MODEL": {"SWIN": {"DEPTHS": [2, 2, 6, 2]}}}, "MODEL.SWIN.DEPTHS: [2, 2, 6, 2]"),
        ({}, {"MODEL": {"SWIN": {"WINDOW_SIZE": 7}}}, "MODEL.SWIN.WINDOW_SIZE: 7"),
        ({}, {"MODEL": {"DECODER_CHANNELS": [18, 36, 72, 144]}}, "MODEL.DECODER_CHANNELS: [18, 36, 72, 144]"),
    ],
)
def test_each_recorded_setting_that_differs_is_one_named_difference(yacs_module, tiny_recipe, mtlora, sections, named):
    cfg, model = tiny_recipe
    config = _plain_config(official_config(yacs_module, mtlora=mtlora))
    for section, values in sections.items():  # nested: MODEL.SWIN.* keeps its other keys
        for key, value in values.items():
            target = config[section]
            if isinstance(value, dict):
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    found = recipe_differences(config, cfg, model)
    assert len(found) == 1 and named in found[0], found


def test_a_matrixv2_file_is_refused_by_the_cli_naming_the_mode(yacs_module, tmp_path, capsys, monkeypatch):
    """Issue 33 item 7: a SHARED_MODE: matrixv2 file imported with exit 0 into a matrix recipe."""
    path = write_official(
        tmp_path / "v2.pth", our_model(), official_config(yacs_module, mtlora={"SHARED_MODE": "matrixv2"})
    )
    args = [*OVERRIDES, f"official={path}", f"run_dir={tmp_path / 'run'}"]
    line = cli_refusal(args, capsys, monkeypatch)
    assert "MODEL.MTLORA.SHARED_MODE: 'matrixv2' in the file, adapter.mode='matrix' here" in line
    assert not (tmp_path / "run").exists()


def test_the_task_scale_is_scale_per_task_defaulting_to_shared_scale(yacs_module):
    """Item 8: the official model never reads TASK_SCALE; SCALE_PER_TASK (else SHARED_SCALE) decides."""
    config = _plain_config(official_config(yacs_module, scale=2.0, mtlora={"TASK_SCALE": [4.0] * 4}))
    config["MODEL"]["MTLORA"]["SCALE_PER_TASK"] = {}  # not filled: the task scale is SHARED_SCALE's
    cfg, model = _recipe(["adapter.shared_scale=2.0"])
    assert recipe_differences(config, cfg, model) == []
    cfg, model = _recipe(["adapter.shared_scale=2.0", "adapter.task_scale=4.0"])
    found = recipe_differences(config, cfg, model)
    assert len(found) == len(TASKS) and all("(task scale of" in f and "adapter.task_scale=4.0" in f for f in found)


def test_trainable_scales_import_including_the_dead_fc2_scale(yacs_module):
    """Item 9: TRAINABLE_SCALE_SHARED=True files carry ...fc2.lora_shared_scale on the dead adapter too."""
    overrides = ["adapter.trainable_scale_shared=true", "adapter.trainable_scale_per_task=true"]
    model = our_model(overrides)
    official = to_official(model)
    dead_scale = "backbone.layers.3.blocks.0.mlp.fc2.lora_shared_scale"
    assert dead_scale in official and official[dead_scale].shape == (1,)
    assert "backbone.layers.3.blocks.0.mlp.fc2.lora_task_scale.semseg" in official
    mapped = from_official(official, model)
    own = dict(model.named_parameters())
    scales = [n for n in own if "scale" in n]
    assert scales and all(torch.equal(mapped[n], own[n]) for n in scales)
    flags = {"TRAINABLE_SCALE_SHARED": True, "TRAINABLE_SCALE_PER_TASK": True}
    cfg, built = _recipe(overrides)
    assert recipe_differences(_plain_config(official_config(yacs_module, mtlora=flags)), cfg, built) == []


def test_backbone_out_never_overwrites_a_file(yacs_module, tmp_path, capsys, monkeypatch):
    """Item 10: another run's backbone at backbone_out= stays as it was; nothing is written."""
    path = write_official(tmp_path / "o.pth", our_model(), official_config(yacs_module))
    other = tmp_path / "other_run_backbone.safetensors"
    other.write_bytes(b"another run's backbone")
    args = [*OVERRIDES, f"official={path}", f"run_dir={tmp_path / 'run'}", f"backbone_out={other}"]
    line = cli_refusal(args, capsys, monkeypatch)
    assert f"backbone_out {other} already exists" in line
    assert other.read_bytes() == b"another run's backbone" and not (tmp_path / "run").exists()


# -- item 13: messages ---------------------------------------------------------------------------------------
def test_a_system_call_payload_is_refused_naming_the_global_without_torch_advice(yacs_module, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    for legacy in (False, True):
        path = tmp_path / f"evil{legacy}.pth"
        state = {"model": to_official(our_model()), "config": official_config(yacs_module), "epoch": Payload()}
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(OfficialCheckpointError) as err:
            read_official(str(path))
        text = str(err.value)
        assert f"it calls {os.system.__module__}.system" in text and "weights_only" not in text, text
        assert "\n" not in text


def test_a_bare_state_dict_is_refused_in_one_short_line(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(to_official(our_model()), path)
    with pytest.raises(OfficialCheckpointError, match="is a bare state dict") as err:
        read_official(str(path))
    assert len(str(err.value)) < 400 and "\n" not in str(err.value), str(err.value)


def test_an_ema_copy_is_named_and_can_be_chosen(yacs_module, tmp_path):
    model = our_model()
    ema = {k: v + 1 for k, v in to_official(model).items()}
    path = write_official(tmp_path / "ema.pth", model, official_config(yacs_module), model_ema=ema)
    default = read_official(str(path))
    assert default.other_weights == {"model_ema": len(ema)} and default.weights_key == "model"
    chosen = read_official(str(path), weights="model_ema")
    assert chosen.other_weights == {"model": len(ema)}
    assert all(torch.equal(chosen.model[k], ema[k]) for k in ema)


# -- item 21: text, truncated and empty files ----------------------------------------------------------------
@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("good")
    state = {"model": to_official(our_model()), "epoch": 3}
    out = {}
    for name, zipped in (("zip", True), ("legacy", False)):
        torch.save(state, root / name, _use_new_zipfile_serialization=zipped)
        out[name] = (root / name).read_bytes()
    return out


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda good: b"", "is empty (0 bytes)"),
        (lambda good: b"hello: this is a yaml file\n" * 40, "is not a torch.save file (text"),
        (lambda good: good["zip"][: len(good["zip"]) // 2], "is truncated or damaged"),
        (lambda good: good["legacy"][: len(good["legacy"]) // 2], "is truncated or damaged"),
        (lambda good: good["legacy"][:40], "is truncated or damaged"),
        (lambda good: bytes(range(7, 200)), "is not a torch.save file (binary data"),
    ],
    ids=["empty", "text", "truncated-zip", "truncated-legacy", "legacy-header-only", "binary"],
)
def test_damaged_files_are_refused_with_the_right_reason(good_files, tmp_path, make, reason):
    path = tmp_path / "ckpt.pth"
    path.write_bytes(make(good_files))
    with pytest.raises(OfficialCheckpointError) as err:
        read_official(str(path))
    assert reason in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_cli_refuses_a_text_file_in_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    path = tmp_path / "notes.pth"
    path.write_text("these are notes, not a checkpoint\n")
    args = [*OVERRIDES, f"official={path}", f"run_dir={tmp_path / 'run'}"]
    line = cli_refusal(args, capsys, monkeypatch)
    assert "is not a torch.save file (text" in line and not (tmp_path / "run").exists()


# -- item 12: continuing with the official optimizer state ---------------------------------------------------
# the official schedule of the test: 4 epochs of 3 optimizer steps, 1 of them warmup, at a global batch of 4;
# the file is saved after epoch 1 (6 steps), as the official save_checkpoint does at an epoch's end
CONTINUE = ["epochs=4", "max_steps=0", "optim.warmup_epochs=1", "optim.lr_timing=lagged", "optim.no_decay=[*.bias]",
            "optim.weight_decay=0.05", "optim.lr_scaling=linear"]  # fmt: skip
PER_EPOCH, EPOCHS_DONE = 3, 2
DEAD = ("backbone.layers.3.blocks.0.mlp.fc2.lora_shared_A", "backbone.layers.3.blocks.0.mlp.fc2.lora_shared_B")


def official_groups(named: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """The official trainable set (mark_only_lora_as_trainable on the backbone, decoders all trainable) split
    by the official set_weight_decay, in the official model's parameter order."""
    words = ("lora_", "patch_embed", "norm", "downsample.reduction", "relative_position_bias_table")
    trainable = [k for k in named if not k.startswith("backbone.") or any(w in k for w in words)]
    decay = [k for k in trainable if not (named[k].dim() == 1 or k.endswith(".bias"))]
    return decay, [k for k in trainable if k not in decay]


def official_optimizer(params: dict[str, torch.nn.Parameter], cfg, lr_scale: float) -> torch.optim.AdamW:
    decay, no_decay = official_groups(params)
    groups = [{"params": [params[k] for k in decay]}, {"params": [params[k] for k in no_decay], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, eps=cfg.optim.eps, betas=tuple(cfg.optim.betas),
                             lr=cfg.optim.base_lr * lr_scale, weight_decay=cfg.optim.weight_decay)  # fmt: skip


@pytest.fixture(scope="module")
def official_run(tmp_path_factory):
    """An official training run's checkpoint after 2 of 4 epochs: weights in the official order, its AdamW
    state_dict over the official groups and timm's CosineLRScheduler stepped as ``train_one_epoch`` does."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    root = tmp_path_factory.mktemp("official-run")
    cfg = load_config(QUICKSTART, [*OVERRIDES, *CONTINUE])
    model = our_model()
    state = to_official(model)
    own = dict(model.named_parameters())
    params = {k: torch.nn.Parameter(v.clone()) for k, v in state.items() if our_key(k) in own or k in DEAD}
    scale = cfg.data.batch_size / 512  # the official linear scaling (one GPU, batch 4)
    optimizer = official_optimizer(params, cfg, scale)
    total, warmup = 4 * PER_EPOCH, PER_EPOCH
    scheduler = CosineLRScheduler(optimizer, t_initial=total - warmup, cycle_mul=1.0, lr_min=cfg.optim.min_lr * scale,
                                  warmup_lr_init=cfg.optim.warmup_lr * scale, warmup_t=warmup, cycle_limit=1,
                                  t_in_epochs=False, warmup_prefix=True)  # fmt: skip
    g = torch.Generator().manual_seed(11)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    for epoch in range(EPOCHS_DONE):
        for idx in range(PER_EPOCH):
            for key, p in params.items():
                p.grad = None if key in DEAD else torch.randn(p.shape, generator=g) * 0.1
            torch.nn.utils.clip_grad_norm_(trained, 5.0)
            optimizer.step()
            scheduler.step_update(epoch * PER_EPOCH + idx)
    weights = {k: params[k].detach().clone() if k in params else v for k, v in state.items()}
    return root, cfg, weights, optimizer.state_dict(), scheduler.state_dict()


def _official_file(path: Path, official_run, yacs_module, optimizer=None) -> Path:
    _, _, weights, opt_state, sched_state = official_run
    config = official_config(yacs_module, TRAIN={"EPOCHS": 4, "WARMUP_EPOCHS": 1})
    state = {"model": weights, "optimizer": optimizer or opt_state, "lr_scheduler": sched_state,
             "max_accuracy": 0.0, "epoch": EPOCHS_DONE - 1, "config": config}  # fmt: skip
    torch.save(state, path)
    return path


def test_continuing_takes_the_official_next_step_in_float64(yacs_module, official_run, single_rank_group, tmp_path):
    """The imported run, resumed as training resumes, takes the step the official code takes next on the same
    batch: AdamW moments and step count mapped by parameter, the lr at the schedule position (float64)."""
    from mtlora_dist.checkpoint import Checkpointer, SavePolicy
    from mtlora_dist.engine.data_setup import batch_geometry
    from mtlora_dist.engine.deepspeed_setup import initialize_engine
    from mtlora_dist.engine.fingerprint import run_fingerprint
    from mtlora_dist.models.precision import align_buffers

    _, cfg, weights, opt_state, _ = official_run
    path = _official_file(tmp_path / "ckpt_epoch_1.pth", official_run, yacs_module)
    run_dir = tmp_path / "run"
    args = [*OVERRIDES, *CONTINUE, f"official={path}", f"run_dir={run_dir}", "optimizer=official"]
    proc = run_cli("import_official.py", ["--config", QUICKSTART, *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # progress and results on stdout, warnings on stderr
    assert "continuing the official run at step 6 (epoch 2, 3 steps per epoch; Adam step 6)" in proc.stdout

    run = load_config(str(run_dir / "config.yaml"))  # resumed as launch/train.py does
    run.deepspeed.zero_stage = 0  # written by ZeRO-2 (the recipe's); read on ZeRO-0, whose torch AdamW takes float64
    seed_everything(run.seed)
    model = build_model(run.model, run.adapter, run.trainable, run.data.tasks, run.data.dataset)
    engine = initialize_engine(
        model, run.optim, run.deepspeed, batch_geometry(run, world_size=1), 4 * PER_EPOCH, PER_EPOCH
    )
    checkpointer = Checkpointer(str(run_dir), engine, policy=SavePolicy(0, 2), fingerprint=run_fingerprint(run))
    assert checkpointer.resume() == EPOCHS_DONE * PER_EPOCH and engine.global_steps == EPOCHS_DONE * PER_EPOCH
    align_buffers(engine.module.double(), torch.float64)  # the same Parameters, now float64 (BN stats fp32)
    inner = engine.optimizer
    for entry in inner.state.values():
        entry.update({k: v.double() for k, v in entry.items() if k != "step"})

    reference = our_model()  # the official code's side: its file's weights, its optimizer state_dict
    reference.load_state_dict(from_official(weights, reference), strict=False)
    align_buffers(reference.double(), torch.float64).train()
    own = dict(reference.named_parameters())
    params = {k: own[our_key(k)] if our_key(k) in own else torch.nn.Parameter(weights[k].double()) for k in weights
              if our_key(k) in own or k in DEAD}  # fmt: skip
    optimizer = official_optimizer(params, cfg, 1.0)
    optimizer.load_state_dict(copy.deepcopy(opt_state))  # moments cast to float64; the step counts stay shared
    assert [g["lr"] for g in inner.param_groups] == pytest.approx([g["lr"] for g in optimizer.param_groups], rel=1e-12)

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    ours = engine(images)
    engine.enable_backward_allreduce = False  # one rank: DeepSpeed's all-reduce (fp32/bf16/fp16 only) is a no-op
    engine.backward(sum((w + 1) * out.pow(2).mean() for w, out in enumerate(ours.values())))
    engine.step()
    theirs = reference(images)
    sum((w + 1) * out.pow(2).mean() for w, out in enumerate(theirs.values())).backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 5.0)
    optimizer.step()

    worst, moved = 0.0, 0
    for name, old in before.items():
        mine, ref = engine.module.get_parameter(name), own[name]
        assert mine.dtype == ref.dtype == torch.float64
        worst = max(worst, ((mine - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item())
        moved += int(not torch.equal(mine, old))
    # 3.3e-11 measured: DeepSpeed sums the clipping norm in fp32; a moment on the wrong parameter is ~1e-3
    assert moved == len(before) and worst < 1e-10, (moved, len(before), worst)


def test_optimizer_state_that_does_not_map_exactly_is_refused_with_the_reason(
    yacs_module, official_run, tmp_path, capsys, monkeypatch
):
    from mtlora_dist.checkpoint.official import official_optimizer_state

    _, cfg, _, opt_state, _ = official_run
    model = our_model()
    good = read_official(str(_official_file(tmp_path / "good.pth", official_run, yacs_module)))
    assert official_optimizer_state(good, model).step == EPOCHS_DONE * PER_EPOCH
    moved = {**opt_state, "param_groups": [dict(g) for g in opt_state["param_groups"]]}
    first, second = moved["param_groups"]
    moved["param_groups"] = [{**first, "params": first["params"][:-1]}, {**second, "params": [first["params"][-1], *second["params"]]}]  # fmt: skip
    bad = read_official(str(_official_file(tmp_path / "bad.pth", official_run, yacs_module, moved)))
    with pytest.raises(OfficialCheckpointError, match=r"parameter groups hold \[\d+, \d+\] parameters"):
        official_optimizer_state(bad, model)
    held = sorted(opt_state["state"])  # each parameter's state moved to the next one's index
    shuffled = {**opt_state, "state": {i: opt_state["state"][held[(j + 1) % len(held)]] for j, i in enumerate(held)}}
    bad = read_official(str(_official_file(tmp_path / "shuffled.pth", official_run, yacs_module, shuffled)))
    with pytest.raises(OfficialCheckpointError, match="its order is not the official model's"):
        official_optimizer_state(bad, model)
    args = [*OVERRIDES, *CONTINUE, "optim.lr_timing=aligned", f"official={tmp_path / 'good.pth'}",
            f"run_dir={tmp_path / 'run'}", "optimizer=official"]  # fmt: skip
    line = cli_refusal(args, capsys, monkeypatch)
    assert "cannot continue with the official optimizer state" in line and "lr_timing" in line
