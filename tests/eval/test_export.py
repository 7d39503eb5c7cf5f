"""Export: folding is exact for every adapter mode, the exported trained model matches the trained model, and an
export loads and predicts without DeepSpeed."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from mtlora_dist.adapters.inject import AdapterConfig, mtlora_layers
from mtlora_dist.data.batch import normalize_image
from mtlora_dist.data.loader import build_loader
from mtlora_dist.engine.restore import resolve_checkpoint, restore_model, run_config
from mtlora_dist.export import ModelSpec, StackedLinear, load, save, to_inference
from mtlora_dist.export.merge import output_difference
from mtlora_dist.models import ModelConfig
from mtlora_dist.models.trainable import TrainableConfig

from evaltest_utils import REPO, run_script

TASKS = ["semseg", "human_parts", "sal", "normals"]
TINY_MODEL = ModelConfig(img_size=[32, 32], drop_path_rate=0.0, decoder_channels=[4, 4, 8, 8], head_hidden_channels=16,
                         backbone_kwargs={"embed_dim": 16, "depths": [1, 2, 1, 1], "num_heads": [1, 1, 2, 2],
                                          "window_size": 2})


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero adapters (B starts at zero) and non-trivial BatchNorm statistics, as after training."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and "scale" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


ADAPTERS = {
    "matrix": AdapterConfig(mode="matrix", shared_rank=8, task_rank=4, dropout=0.0),
    "matrixv2": AdapterConfig(mode="matrixv2", shared_rank=8, task_rank=4, dropout=0.0),
    "addition": AdapterConfig(mode="addition", shared_rank=8, task_rank=4, dropout=0.0),
    "lora_only": AdapterConfig(mode="lora_only", shared_rank=8, task_rank=4, dropout=0.0),
    "per-task ranks and scales": AdapterConfig(shared_rank=[4, 4, 8, 8], dropout=0.0,
                                               task_rank={"semseg": 2, "human_parts": 4, "sal": 3, "normals": 1},
                                               task_scale={"semseg": 1.0, "human_parts": 2.0, "sal": 3.0,
                                                           "normals": 0.5}, trainable_scale_per_task=True),
    "MTLoRA+ (LoRA on patch merging)": AdapterConfig(shared_rank=8, task_rank=4, dropout=0.0, ta_targets=[
        "layers.*.blocks.*.attn.qkv", "layers.*.blocks.*.attn.proj", "layers.*.blocks.*.mlp.fc1",
        "layers.*.blocks.*.mlp.fc2", "layers.*.downsample.reduction"]),
}


def _tiny(adapter: str) -> tuple[ModelSpec, torch.nn.Module]:
    spec = ModelSpec(TINY_MODEL, ADAPTERS[adapter], TrainableConfig(), TASKS, "pascal_context")
    torch.manual_seed(0)
    return spec, _randomized(spec.build())


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fold_task_proj", [False, True], ids=["default", "fold_task_proj"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_folded_model_equals_the_adapted_model(adapter, fold_task_proj):
    _, model = _tiny(adapter)
    folded = copy.deepcopy(model)
    summary = to_inference(folded, fold_task_proj=fold_task_proj)
    assert max(output_difference(model, folded, IMAGES).values()) < 1e-5

    assert summary.batchnorm_folded == len(TASKS)
    left = mtlora_layers(folded)
    assert sorted(left) == summary.adapters_left
    assert all(layer.tasks for layer in left.values()), "a layer without task branches was left unmerged"
    stacked = [m for m in folded.modules() if isinstance(m, StackedLinear)]
    expected = 4 if fold_task_proj and adapter not in ("addition", "lora_only") else 0  # one TS proj per stage
    assert len(stacked) == summary.task_proj_folded == expected


@pytest.mark.parametrize("fold_task_proj", [False, True], ids=["default", "fold_task_proj"])
def test_save_and_load_give_the_same_model(fold_task_proj, tmp_path):
    spec, model = _tiny("per-task ranks and scales")
    summary = to_inference(model, fold_task_proj=fold_task_proj)
    loaded = load(save(model, spec, summary, str(tmp_path)))
    assert loaded.summary == summary and loaded.img_size == (32, 32)
    with torch.no_grad():
        expected, got = model(IMAGES), loaded(IMAGES)
    assert all(torch.equal(expected[t], got[t]) for t in TASKS)
    (tmp_path / "model.safetensors").write_bytes(b"not the exported weights")
    with pytest.raises(ValueError, match="sha256"):
        load(str(tmp_path))


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    run_script("export.py", [f"checkpoint={trained_run.run_dir}", f"out={out}"], trained_run.workdir)
    return out


@pytest.mark.integration
def test_the_exported_model_matches_the_trained_model_on_validation_images(trained_run, exported):
    manifest = json.loads((exported / "export.json").read_text())
    assert manifest["source"] == {"checkpoint": f"{trained_run.run_dir}/checkpoints/step_00000006", "step": 6,
                                  "run_dir": trained_run.run_dir}
    assert manifest["merge"]["ta_lora_merged"] > 0 and manifest["merge"]["fold_task_proj"] is False
    assert max(manifest["check"]["max_relative_difference"].values()) < 1e-5

    cfg = run_config(trained_run.run_dir)
    trained = restore_model(cfg, resolve_checkpoint(trained_run.run_dir))
    model = load(str(exported))
    batch = next(iter(build_loader(cfg.data.val_url, dataset="pascal_context", tasks=TASKS, split="val",
                                   img_size=(64, 64), batch_size=6)))
    images = normalize_image(batch["image"])
    differences = output_difference(trained, model, images)
    assert max(differences.values()) < 1e-5, differences
    state = model.net.state_dict()
    assert not any("lora_" in k for k in state if not any(k.startswith(f"{n}.") for n in model.summary.adapters_left))


PREDICT_WITHOUT_DEEPSPEED = """
import sys
sys.modules["deepspeed"] = None  # importing it now raises ImportError
import numpy as np
from PIL import Image
from mtlora_dist.export import load, predict

model = load(sys.argv[1])
image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
maps = predict(model, image)
same = predict(model, Image.fromarray(image))
assert all(np.array_equal(maps[t], same[t]) for t in maps)
assert maps["semseg"].shape == (50, 70) and maps["semseg"].dtype == np.uint8 and maps["semseg"].max() < 21
assert maps["human_parts"].dtype == np.uint8 and maps["human_parts"].max() < 7
assert maps["sal"].shape == (50, 70) and maps["sal"].dtype == np.float32
assert 0 <= maps["sal"].min() <= maps["sal"].max() <= 1
assert maps["normals"].shape == (50, 70, 3) and np.allclose(np.linalg.norm(maps["normals"], axis=-1), 1, atol=1e-5)
assert not [m for m in sys.modules if m.startswith(("mtlora_dist.engine", "hydra"))]
print("predicted", sorted(maps))
"""


@pytest.mark.integration
def test_an_export_loads_and_predicts_without_deepspeed(exported):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", PREDICT_WITHOUT_DEEPSPEED, str(exported)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predicted ['human_parts', 'normals', 'sal', 'semseg']" in proc.stdout


@pytest.mark.integration
def test_predict_runs_the_evaluation_pipeline(exported):
    """At the model's input size the resize is the identity, so predict = decode(model(normalised image))."""
    from mtlora_dist.export import predict

    model = load(str(exported))
    image = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8).numpy()
    with torch.no_grad():
        logits = model(normalize_image(torch.from_numpy(image).permute(2, 0, 1)[None]))
    maps = predict(model, image)
    assert (maps["semseg"] == logits["semseg"][0].argmax(0).numpy()).all()
    assert torch.allclose(torch.from_numpy(maps["sal"]), torch.sigmoid(logits["sal"][0, 0]), atol=1e-6)
