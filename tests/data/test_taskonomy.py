"""Taskonomy as a declared dataset (configs/data/taskonomy.yaml): per-building folders, splits by building,
16-bit depth with its invalid value, RGB normals in Taskonomy's axes, thresholded texture edges, the 17 semantic
classes, and views lacking some domains (partial labels) converted, streamed and trained on."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runs import TINY_RUN, run_script, train_records

from mtlora_dist.config import data_config
from mtlora_dist.data.ingest.formats import get_reader
from mtlora_dist.data.ingest.formats.decoders import DeclaredSample, decode_label
from mtlora_dist.synthetic.layouts import (
    TASKONOMY_CLASSES,
    TASKONOMY_COLOURS,
    TASKONOMY_TASK_DOMAINS,
    make_taskonomy_tree,
    sobel_magnitude,
    taskonomy_scene,
)

from datatest_utils import convert_splits
from factories import make_loader

REPO = Path(__file__).resolve().parents[2]
TASKS = ["semseg", "normals", "depth", "edge"]
BUILDINGS = {"train": ["allensville", "beechwood", "coffeen"], "val": ["collierville"]}
MISSING = {"depth": 0.2, "edge": 0.15, "normals": 0.1}


@pytest.fixture(scope="module")
def data():
    return data_config("taskonomy")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("taskonomy")
    return make_taskonomy_tree(root, BUILDINGS, per_building=4, size=48, seed=2, missing=MISSING, keep_labels=True)


@pytest.fixture(scope="module")
def shards(tree, data, tmp_path_factory):
    return convert_splits("taskonomy", tree.root, tmp_path_factory.mktemp("taskonomy_shards"), fmt=data.format)


def _sample(root: Path, shape: tuple[int, int], building: str = "allensville") -> DeclaredSample:
    return DeclaredSample(str(root), {"building": building, "point": "12", "view": "3"}, shape)


def _decode(root: Path, label, stored: np.ndarray) -> np.ndarray:
    """Write ``stored`` where ``label`` expects the file of a sample, and decode it as the config says."""
    sample = _sample(root, stored.shape[:2])
    path = Path(sample.path(label.file))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stored).save(path)
    return decode_label(sample, label)


# ------------------------------------------------------------------------------------------ the decoders


def test_depth_is_in_units_of_1_512_metre_and_65535_has_none(tmp_path, data):
    stored = np.array([[0, 512, 1024], [65534, 65535, 256]], dtype=np.uint16)
    depth = _decode(tmp_path, data.format.tasks["depth"], stored)
    expected = np.array([[0.0, 1.0, 2.0], [127.99609375, 0.0, 0.5]], dtype=np.float32)
    assert depth.dtype == np.float32
    np.testing.assert_allclose(depth, expected, rtol=1e-7)


def test_normals_turn_from_taskonomy_axes_into_ours_and_grey_has_none(tmp_path, data):
    # Taskonomy stores (x left, y up, z towards the camera) as v = 255 (n + 1) / 2; ours: x right, y down, z out.
    stored = np.array(
        [
            [[128, 128, 255], [128, 255, 128], [255, 128, 128]],  # facing us; up (a floor); left
            [[128, 128, 128], [0, 128, 128], [128, 0, 128]],
        ],
        dtype=np.uint8,
    )  # none; right; down
    normals = _decode(tmp_path, data.format.tasks["normals"], stored)
    expected = np.array([[[0, 0, 1], [0, -1, 0], [-1, 0, 0]], [[0, 0, 0], [1, 0, 0], [0, 1, 0]]], dtype=np.float32)
    np.testing.assert_allclose(normals, expected, atol=0.01)
    np.testing.assert_allclose(np.linalg.norm(normals[0], axis=-1), 1.0, atol=1e-5)


def test_semantic_ids_0_uncertain_1_background_2_to_17_objects(tmp_path, data):
    label = data.format.tasks["semseg"]
    # taskonomy's coco_selected_classes.txt, in stored order 1..17
    assert label.class_names == list(TASKONOMY_CLASSES) and label.num_classes == 17
    stored = np.array([[0, 1, 2, 9], [17, 16, 18, 200]], dtype=np.uint8)
    semseg = _decode(tmp_path, label, stored)
    # 0 is masked (uncertain); ids the table does not list (never in real data) are ignored too
    np.testing.assert_array_equal(semseg, [[255, 0, 1, 8], [16, 15, 255, 255]])


def test_a_class_id_beyond_the_classes_is_a_clear_error_without_the_table(tmp_path, data):
    label = copy.deepcopy(data.format.tasks["semseg"])
    label.id_map = None  # as someone might declare it: stored ids taken as classes
    with pytest.raises(ValueError, match=r"holds class ids \[17, 40\] outside 0..16; set num_classes"):
        _decode(tmp_path, label, np.array([[1, 2], [17, 40]], dtype=np.uint8))


def test_texture_edges_are_magnitudes_above_4_percent_of_full_scale(tmp_path, data):
    label = data.format.tasks["edge"]
    stored = np.array([[0, 2621, 2622, 65535], [1000, 30000, 2600, 2700]], dtype=np.uint16)  # 0.04 * 65535 = 2621.4
    np.testing.assert_array_equal(_decode(tmp_path, label, stored), [[0, 0, 1, 1], [0, 1, 0, 1]])
    step = np.zeros((40, 40))
    step[:, 20:] = 1.0
    # why 0.04: a unit step blurred as Taskonomy does (sigma 3) peaks near 0.18, so ~20 % contrast is an edge
    assert sobel_magnitude(step, 3.0).max() == pytest.approx(0.18, abs=0.01)


def test_a_missing_label_file_is_an_error_naming_it_unless_the_task_is_optional(tmp_path, data):
    label = copy.deepcopy(data.format.tasks["depth"])
    with pytest.raises(FileNotFoundError, match=r"not found: .*allensville/depth_zbuffer/point_12_view_3_domain_"):
        decode_label(_sample(tmp_path, (2, 2)), label)
    assert all(t.optional for t in data.format.tasks.values()), "Taskonomy lacks some domains for some views"


# ------------------------------------------------------------------------------------ the synthetic tree


def test_the_tree_has_the_real_layout_and_splits_are_by_building(tree, data):
    root = Path(tree.root)
    key = tree.samples["train"][0]
    building, point, view = key.split("__")
    assert (root / building / "rgb" / f"point_{point}_view_{view}_domain_rgb.png").is_file()
    for task, (folder, domain) in TASKONOMY_TASK_DOMAINS.items():
        path = root / building / folder / f"point_{point}_view_{view}_domain_{domain}.png"
        assert path.is_file() == (key not in tree.missing.get(task, [])), path
    assert (root / "splits" / "train.txt").read_text().split() == BUILDINGS["train"]
    with Image.open(root / building / "depth_zbuffer" / f"point_{point}_view_{view}_domain_depth_zbuffer.png") as im:
        assert im.mode == "I;16"
    reader = get_reader("taskonomy", tree.root, fmt=data.format)
    for split, buildings in BUILDINGS.items():
        ids = reader.ids(split)
        assert ids == tree.samples[split] and {k.split("__")[0] for k in ids} == set(buildings)
    with pytest.raises(FileNotFoundError, match=r"split file for 'test' not found: .*splits/test.txt"):
        reader.ids("test")


def test_a_building_not_in_the_split_file_is_left_out(tree, data, tmp_path):
    split_root = tmp_path / "one_building"
    (split_root / "splits").mkdir(parents=True)
    os.symlink(Path(tree.root) / "allensville", split_root / "allensville")
    os.symlink(Path(tree.root) / "beechwood", split_root / "beechwood")
    (split_root / "splits" / "train.txt").write_text("beechwood\n")
    ids = get_reader("taskonomy", str(split_root), fmt=data.format).ids("train")
    assert ids and all(k.startswith("beechwood__") for k in ids)


def test_the_tree_reads_back_as_its_labels_with_missing_domains_left_out(tree, data):
    reader = get_reader("taskonomy", tree.root, fmt=data.format)
    threshold = data.format.tasks["edge"].positive_above
    for split in ("train", "val"):
        reader.ids(split)
        for key in tree.samples[split]:
            sample, truth = reader.read(key), tree.labels[key]
            for task in TASKS:
                assert (task in sample) == (key not in tree.missing.get(task, [])), (key, task)
            np.testing.assert_array_equal(sample["semseg"], truth["semseg"])
            if "depth" in sample:
                np.testing.assert_allclose(sample["depth"], truth["depth"], atol=1.0 / 1024)
            if "normals" in sample:
                valid = np.linalg.norm(truth["normals"], axis=-1) > 0
                np.testing.assert_array_equal(np.linalg.norm(sample["normals"], axis=-1) > 0, valid)
                cosine = (sample["normals"][valid] * truth["normals"][valid]).sum(-1)
                assert np.degrees(np.arccos(np.clip(cosine, -1, 1))).max() < 1.0
            if "edge" in sample:
                np.testing.assert_array_equal(sample["edge"], truth["edge"] > threshold)
    assert all(tree.missing[t] for t in MISSING), "every domain named in missing lacks a file somewhere"


def test_colour_tells_the_object_class_so_the_labels_are_learnable():
    stored_ids = np.array(list(TASKONOMY_COLOURS))
    palette = np.stack([TASKONOMY_COLOURS[i] for i in stored_ids]) + 1e-3
    palette /= palette.sum(-1, keepdims=True)
    for point in range(4):
        scene = taskonomy_scene(5, "beechwood", point, 0, 48)
        rgb = scene.image.astype(np.float64) + 1e-3
        chroma = rgb / rgb.sum(-1, keepdims=True)
        nearest = np.argmin(((chroma[:, :, None] - palette) ** 2).sum(-1), axis=-1)
        objects = (scene.labels["semseg"] != 255) & (scene.labels["semseg"] > 0)
        assert ((stored_ids[nearest] - 1)[objects] == scene.labels["semseg"][objects]).mean() > 0.9


# ------------------------------------------------------------------------------------ shards and batches


def test_the_manifest_records_optional_tasks_and_missing_labels(shards, tree):
    for split in ("train", "val"):
        manifest = shards["manifests"][split]
        assert manifest["dataset"] == "taskonomy" and manifest["tasks"] == TASKS
        assert manifest["num_outputs"] == {"semseg": 17, "normals": 3, "depth": 1, "edge": 1}
        assert manifest["optional_tasks"] == TASKS
        in_split = set(tree.samples[split])
        expected = {t: len([k for k in tree.missing.get(t, []) if k in in_split]) for t in TASKS}
        assert manifest["labels_missing"] == expected
        assert manifest["num_samples"] == len(tree.samples[split])


def test_a_batch_streams_with_the_missing_labels_marked(shards, tree):
    loader = make_loader(shards["urls"]["train"], dataset="taskonomy", tasks=TASKS, split="train",
                          img_size=(32, 32), batch_size=12)  # fmt: skip
    batch = next(iter(loader))
    loader.close()
    assert tuple(batch["image"].shape) == (12, 3, 32, 32) and tuple(batch["normals"].shape) == (12, 3, 32, 32)
    assert set(batch["semseg"].unique().tolist()) <= set(range(17)) | {255}
    assert set(batch["edge"].unique().tolist()) <= {0, 1, 255} and (batch["edge"] == 1).any()
    for task in TASKS:
        labeled = dict(zip(batch["__key__"], batch[f"labeled/{task}"].tolist()))
        assert labeled == {k: k not in tree.missing.get(task, []) for k in batch["__key__"]}, task
    present = batch["labeled/depth"]
    assert bool(batch["depth"][present].isfinite().all()) and (batch["depth"][present] > 0).any()


# --------------------------------------------------------------------------------------------- training


@pytest.mark.integration
def test_launch_train_runs_on_shards_with_missing_labels_and_reports_every_task(shards, tree, tmp_path):
    run_dir = tmp_path / "run"
    urls = shards["urls"]
    run_script("train.py", ["data=taskonomy", f"data.train_url={urls['train']}", f"data.val_url={urls['val']}", "max_steps=3",
            *TINY_RUN, f"run_dir={run_dir}"], tmp_path)  # fmt: skip
    train, final = train_records(run_dir, 3, TASKS)
    # 12 training views, 4 a batch: steps 1-3 cover every view once, so every missing label was met
    seen = train[-1]["data"]
    for task in MISSING:
        expected = len([k for k in tree.missing[task] if k in tree.samples["train"]])
        assert seen[f"labels_missing/{task}"] == expected, task
    final = final["tasks"]
    assert 0.0 <= final["semseg"]["mIoU"] <= 100.0 and math.isfinite(final["depth"]["rmse"])
    assert math.isfinite(final["normals"]["mean"]) and math.isfinite(final["edge"]["odsF"])
