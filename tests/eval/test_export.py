"""Export of a trained run: the exported model matches the trained model, and an export loads and predicts
without DeepSpeed. Folding and the save/load round trip of every adapter mode are in
``tests/models/test_model_table.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mtlora_dist.config import run_config
from mtlora_dist.data.stream.batch import normalize_image
from mtlora_dist.engine.restore import resolve_checkpoint, restore_model
from mtlora_dist.export import load
from mtlora_dist.export.merge import output_difference

from evaltest_utils import REPO, run_script
from factories import make_loader

TASKS = ["semseg", "human_parts", "sal", "normals"]


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    run_script("export.py", [f"checkpoint={trained_run.run_dir}", f"out={out}"], trained_run.workdir)
    return out


@pytest.mark.integration
def test_the_exported_model_matches_the_trained_model_on_validation_images(trained_run, exported):
    manifest = json.loads((exported / "export.json").read_text())
    assert manifest["source"] == {
        "checkpoint": f"{trained_run.run_dir}/checkpoints/step_00000006",
        "step": 6,
        "run_dir": trained_run.run_dir,
    }
    assert manifest["merge"]["ta_lora_merged"] > 0 and manifest["merge"]["fold_task_proj"] is False
    assert max(manifest["check"]["max_relative_difference"].values()) < 1e-5

    cfg = run_config(trained_run.run_dir)
    trained = restore_model(cfg, resolve_checkpoint(trained_run.run_dir))
    model = load(str(exported))
    batch = next(
        iter(
            make_loader(
                cfg.data.val_url, dataset="pascal_context", tasks=TASKS, split="val", img_size=(64, 64), batch_size=6
            )
        )
    )
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
    proc = subprocess.run(
        [sys.executable, "-c", PREDICT_WITHOUT_DEEPSPEED, str(exported)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
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
