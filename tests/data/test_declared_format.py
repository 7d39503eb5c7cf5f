"""A dataset declared in a data config: registration, the reader, the label decoders, partial labels in
the shards and the batches, and the whole round trip (convert -> stream -> train -> evaluate)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runs import TINY_RUN, run_script, train_records

from mtlora_dist.adapters import AdapterConfig
from mtlora_dist.config import ConfigError, data_config, load_config
from mtlora_dist.data.ingest.convert import convert
from mtlora_dist.data.ingest.format_spec import DatasetFormat, LabelFormat, register_format
from mtlora_dist.data.ingest.formats import get_reader
from mtlora_dist.data.ingest.formats.decoders import DeclaredSample, decode_label
from mtlora_dist.export.artifact import ModelSpec
from mtlora_dist.models.trainable import TrainableConfig
from mtlora_dist.tasks.evaluation import MultiTaskEvaluator
from mtlora_dist.tasks.losses import MultiTaskLoss
from mtlora_dist.tasks.registry import get_dataset, get_task

from declared_data import NAME, TASKS, make_tree, write_configs
from factories import make_loader, tiny_model_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def declared(tmp_path_factory):
    """The recipe, the data config, the tree (every 3rd road label missing) and its shards."""
    base = tmp_path_factory.mktemp("declared")
    recipe = write_configs(base / "configs")
    root = make_tree(base / "tree", {"train": 16, "val": 6}, seed=1, road_missing_every=3)
    data = data_config(str(base / "configs" / "data" / f"{NAME}.yaml"))
    shards = {split: str(base / "shards" / split) for split in ("train", "val")}
    manifests = {s: convert(NAME, str(root), s, url, shard_size_mb=0.02, fmt=data.format) for s, url in shards.items()}
    return {"base": base, "recipe": recipe, "root": root, "data": data, "shards": shards, "manifests": manifests}


def test_a_declared_dataset_is_registered_with_its_tasks_and_heads(declared):
    spec = get_dataset(NAME)
    assert spec.num_outputs == {"semseg": 3, "road": 1, "height": 1}
    assert spec.class_names["semseg"] == ("sky", "building", "ground")
    assert spec.baselines == {"semseg": 40.0, "road": 50.0, "height": 2.0}
    assert (get_task("road").target_kind, get_task("road").loss) == ("binary_map", "balanced_bce")
    assert (get_task("height").target_kind, get_task("height").primary_metric) == ("depth", "rmse")


def test_the_reader_decodes_each_kind_from_its_declaration(declared):
    reader = get_reader(NAME, str(declared["root"]), fmt=declared["data"].format)
    ids = reader.ids("train")
    assert len(ids) == 16 and ids[0] == "scene0__f0000"
    sample = reader.read(ids[0])
    stored = np.asarray(Image.open(declared["root"] / "labels/train/scene0/f0000_ids.png"))
    expected = np.select([stored == 0, stored == 10, stored == 20], [0, 1, 2], 255)
    np.testing.assert_array_equal(sample["semseg"], expected)
    raw = np.asarray(Image.open(declared["root"] / "height/train/scene0/f0000.png")).astype(np.float32)
    np.testing.assert_allclose(sample["height"], np.where(raw == 0, 0.0, raw * 0.001), rtol=1e-6)
    road = np.asarray(Image.open(declared["root"] / "road/train/scene0/f0000.png"))
    np.testing.assert_array_equal(sample["road"], (road > 127).astype(np.uint8))
    assert "road" not in reader.read("scene0__f0002"), "a missing optional label is left out, not invented"


def test_manifest_records_optional_tasks_and_how_many_labels_are_missing(declared):
    manifest = declared["manifests"]["train"]
    assert manifest["optional_tasks"] == ["road"]
    assert manifest["labels_missing"] == {"road": 16 // 3}
    assert manifest["num_outputs"] == {"semseg": 3, "road": 1, "height": 1}
    assert manifest["class_names"] == {"semseg": ["sky", "building", "ground"]}


@pytest.mark.parametrize("augment_device", ["worker", "device"])
def test_a_sample_without_a_label_streams_as_unsupervised_and_is_counted(declared, augment_device):
    loader = make_loader(declared["shards"]["train"], dataset=NAME, tasks=TASKS, split="train", img_size=(32, 32),
                          batch_size=4, augment_device=augment_device, device="cpu")  # fmt: skip
    batches = list(loader)
    has_road = torch.cat([b["labeled/road"] for b in batches])
    assert (~has_road).sum() == loader.stats["labels_missing/road"] == 16 // 3
    assert all(b["labeled/semseg"].all() and b["labeled/height"].all() for b in batches)
    for batch in batches:
        lacking = ~batch["labeled/road"]
        assert (batch["road"][lacking] == 255).all(), "a missing label must be all ignore"
        assert (batch["road"][~lacking] != 255).any()


def test_missing_labels_give_zero_loss_and_zero_gradient_and_are_not_scored(declared):
    loader = make_loader(declared["shards"]["train"], dataset=NAME, tasks=TASKS, split="train", img_size=(32, 32),
                          batch_size=4)  # fmt: skip
    batch = next(b for b in loader if not b["labeled/road"].all() and b["labeled/road"].any())
    lacking = ~batch["labeled/road"]
    logits = torch.randn(4, 1, 32, 32, requires_grad=True)
    preds = {"semseg": torch.randn(4, 3, 32, 32), "road": logits, "height": torch.rand(4, 1, 32, 32)}
    _, losses = MultiTaskLoss(TASKS)(preds, batch)
    alone = MultiTaskLoss(["road"])({"road": logits[lacking]}, {"road": batch["road"][lacking]})[0]
    alone.backward()
    assert alone.item() == 0.0 and logits.grad is not None and (logits.grad == 0).all()
    assert losses["road"].item() > 0

    # the metric over the batch equals the metric over the labelled samples alone
    evaluator = MultiTaskEvaluator(["road"], NAME)
    evaluator.update({"road": logits.detach()}, batch)
    only = MultiTaskEvaluator(["road"], NAME)
    kept = {"road": batch["road"][~lacking], "label_size": batch["label_size"][~lacking]}
    only.update({"road": logits.detach()[~lacking]}, kept)
    assert evaluator.compute()["road"] == only.compute()["road"]


@pytest.mark.parametrize("kind", ["class_map", "binary_map", "scalar"])
def test_a_one_row_label_keeps_its_two_dimensions(tmp_path, kind):
    """A label 1 pixel high is HxW, not squeezed to a vector (and a 16-bit map stays 16-bit)."""
    Image.fromarray(np.array([[0, 1, 2, 1]], np.uint16)).save(tmp_path / "l.png")
    label = LabelFormat(kind=kind, file="l.png", num_classes=3)
    sample = DeclaredSample(str(tmp_path), {"split": "train"}, (1, 4))
    decoded = decode_label(sample, label)
    assert decoded.shape == (1, 4)
    expected = {"class_map": [[0, 1, 2, 1]], "binary_map": [[0, 0, 0, 0]], "scalar": [[0.0, 1.0, 2.0, 1.0]]}[kind]
    np.testing.assert_array_equal(decoded, np.array(expected, decoded.dtype))


def test_shards_converted_with_other_class_counts_are_refused(declared):
    fmt = declared["data"].format
    semseg = dataclasses.replace(fmt.tasks["semseg"], num_classes=4, class_names=None)
    register_format("street_demo_k4", dataclasses.replace(fmt, tasks={**fmt.tasks, "semseg": semseg}))
    manifest = json.loads((Path(declared["shards"]["train"]) / "manifest.json").read_text())
    manifest["dataset"] = "street_demo_k4"
    other = Path(declared["base"]) / "k4"
    shutil.copytree(declared["shards"]["train"], other)
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"semseg: 3 in the shards, 4 now\); convert the dataset again"):
        make_loader(str(other), dataset="street_demo_k4", tasks=TASKS, split="train", img_size=(32, 32), batch_size=4)


def test_declaration_errors_name_the_key_and_the_fix(tmp_path):
    bad = DatasetFormat(
        image="images/{split}/{id}.jpg", tasks={"semseg": LabelFormat(kind="class_map", file="l/{id}.png")}
    )
    with pytest.raises(ValueError, match="num_classes must be 1..255"):
        register_format("bad_demo", bad)
    bad = DatasetFormat(image="images/{split}/{id}.jpg", tasks={"edge": LabelFormat(kind="scalar", file="e/{id}.png")})
    with pytest.raises(ValueError, match="registered as a binary_map task but is declared as kind 'scalar'"):
        register_format("bad_demo", bad)
    bad = DatasetFormat(image="images/{id}.jpg", tasks={"x": LabelFormat(kind="binary_map", file="x/{name}.png")})
    with pytest.raises(ValueError, match=r"uses field\(s\) \['name'\]"):
        register_format("bad_demo", bad)
    config = tmp_path / "oops.yaml"
    config.write_text(
        "dataset: nyud\nformat:\n  image: a/{id}.jpg\n  tasks:\n    semseg:\n      file: b/{id}.png\n      num_classes: 2\n"
    )
    with pytest.raises(ConfigError, match="built-in dataset"):
        data_config(str(config))
    with pytest.raises(ConfigError, match="neither built in.*format:"):
        load_config(None, ["data.dataset=no_such_set"])


def test_a_label_outside_the_declared_classes_is_a_clear_error(declared, tmp_path):
    root = make_tree(tmp_path / "tree", {"train": 2})
    fmt = declared["data"].format
    semseg = LabelFormat(kind="class_map", file=fmt.tasks["semseg"].file, num_classes=3)  # no id_map, no ignore
    raw = DatasetFormat(image=fmt.image, tasks={"semseg": semseg})
    register_format("raw_ids_demo", raw)
    with pytest.raises(ValueError, match=r"holds class ids \[10, 20, 99\] outside 0..2; set num_classes"):
        get_reader("raw_ids_demo", str(root), fmt=raw, split="train").read("scene0__f0000")


def test_an_exported_spec_rebuilds_a_declared_model_in_a_process_without_the_config(declared, tmp_path):
    spec = ModelSpec(tiny_model_config(), AdapterConfig(shared_rank=4, task_rank=2), TrainableConfig(), TASKS, NAME)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    code = (
        "import json, sys; from mtlora_dist.export.artifact import ModelSpec; "
        "net = ModelSpec.from_dict(json.load(open(sys.argv[1]))).build(); "
        "import torch; out = net(torch.zeros(1, 3, 64, 64)); print({t: o.shape[1] for t, o in out.items()})"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "spec.json")], capture_output=True, text=True,
                          cwd=REPO, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "{'semseg': 3, 'road': 1, 'height': 1}"


@pytest.mark.integration
def test_round_trip_convert_stream_train_evaluate(declared, tmp_path):
    """What a user does with a dataset of their own: train two steps on its shards, then evaluate the checkpoint."""
    run_dir = tmp_path / "run"
    common = [
        *TINY_RUN,
        f"data.train_url={declared['shards']['train']}",
        f"data.val_url={declared['shards']['val']}",
        "eval.visual_samples=2",
    ]

    def run(script: str, args: list[str]) -> None:
        run_script(script, args, tmp_path, config=str(declared["recipe"]))

    run("train.py", [*common, f"run_dir={run_dir}", "max_steps=2"])
    _, val = train_records(run_dir, 2, TASKS)
    assert set(val["tasks"]) == set(TASKS)
    assert "mIoU" in val["tasks"]["semseg"] and "rmse" in val["tasks"]["height"]
    assert val["delta_m"] is not None, "the declared baselines give a Delta-m"
    assert list((run_dir / "reports").glob("predictions_step_*.png")), "the prediction grid is drawn"

    out = tmp_path / "eval"
    run("eval.py", [*common, f"checkpoint={run_dir}", f"out={out}"])
    report = json.loads(next(out.glob("step_00000002_val_*.json")).read_text())
    assert report["dataset"] == NAME
    for task in TASKS:
        assert report["tasks"][task]["metrics"] == val["tasks"][task], f"{task}: evaluation differs from training"
