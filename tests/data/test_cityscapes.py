"""Cityscapes as a declared dataset (configs/data/cityscapes.yaml): labelId -> trainId, disparity -> depth
with each image's camera, the synthetic tree in the real layout converted, streamed and trained on."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runs import TINY_RUN, run_script, train_records

from mtlora_dist.config import ConfigError, data_config
from mtlora_dist.data.ingest.format_spec import register_format
from mtlora_dist.data.ingest.formats import get_reader
from mtlora_dist.data.ingest.formats.cityscapes import disparity_to_depth
from mtlora_dist.data.ingest.formats.decoders import DeclaredSample, decode_label
from mtlora_dist.synthetic.layouts import (
    CITYSCAPES_COLOURS,
    CITYSCAPES_TRAIN_IDS,
    cityscapes_scene,
    make_cityscapes_tree,
)

from datatest_utils import convert_splits
from factories import make_loader

REPO = Path(__file__).resolve().parents[2]
SIZE = (64, 128)
# The official table (cityscapesscripts/helpers/labels.py): labelId -> name of the trainId class.
OFFICIAL = {7: "road", 8: "sidewalk", 11: "building", 12: "wall", 13: "fence", 17: "pole", 19: "traffic light",
            20: "traffic sign", 21: "vegetation", 22: "terrain", 23: "sky", 24: "person", 25: "rider", 26: "car",
            27: "truck", 28: "bus", 31: "train", 32: "motorcycle", 33: "bicycle"}  # fmt: skip


@pytest.fixture(scope="module")
def data():
    return data_config("cityscapes")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_cityscapes_tree(tmp_path_factory.mktemp("cityscapes"), {"train": 8, "val": 4}, SIZE, keep_labels=True)


@pytest.fixture(scope="module")
def shards(tree, data, tmp_path_factory):
    return convert_splits("cityscapes", tree.root, tmp_path_factory.mktemp("cityscapes_shards"), fmt=data.format)


def _sample(root: Path, shape: tuple[int, int], city: str = "aachen", frame: str = "aachen_000000_000019"):
    return DeclaredSample(str(root), {"split": "train", "city": city, "frame": frame}, shape)


def _write(root: Path, pattern: str, sample: DeclaredSample, array=None, camera=None) -> None:
    path = Path(sample.path(pattern))
    path.parent.mkdir(parents=True, exist_ok=True)
    if camera is not None:
        path.write_text(json.dumps(camera))
    else:
        Image.fromarray(array).save(path)


def _camera(baseline: float, fx: float) -> dict:
    return {"extrinsic": {"baseline": baseline, "pitch": 0.0}, "intrinsic": {"fx": fx, "fy": fx, "u0": 1.0, "v0": 1.0}}


# ------------------------------------------------------------------------------------------ the declaration


def test_the_config_declares_19_classes_with_the_official_train_ids_and_names(data):
    semseg = data.format.tasks["semseg"]
    assert semseg.num_classes == 19 and sorted(semseg.id_map.values()) == list(range(19))
    assert {label_id: semseg.class_names[train_id] for label_id, train_id in semseg.id_map.items()} == OFFICIAL
    assert data.tasks == ["semseg", "depth"] and data.format.tasks["depth"].units == "m"
    assert (data.train_url, data.val_url) == (None, None), "shards must be named by the user"


def test_label_ids_become_train_ids_and_every_other_id_is_ignored(tmp_path, data):
    label = data.format.tasks["semseg"]
    stored = np.arange(0, 36, dtype=np.uint8).reshape(2, 18)  # every labelId (0..33) and two beyond
    sample = _sample(tmp_path, stored.shape)
    _write(tmp_path, label.file, sample, stored)
    decoded = decode_label(sample, label)
    expected = [list(OFFICIAL).index(i) if i in OFFICIAL else 255 for i in range(36)]
    assert decoded.dtype == np.uint8 and decoded.ravel().tolist() == expected


def test_a_declaration_mapping_to_a_class_beyond_the_19_is_refused(data):
    fmt = copy.deepcopy(data.format)
    fmt.tasks["semseg"].id_map[34] = 19
    with pytest.raises(ValueError, match=r"id_map maps to class ids \[19\] outside 0..18"):
        register_format("cityscapes_bad_ids", fmt)
    with pytest.raises(ConfigError, match="no data config 'cityscape'"):
        data_config("cityscape")


# ----------------------------------------------------------------------------------------- disparity -> depth


def test_disparity_is_turned_into_metres_as_computed_by_hand():
    stored = np.array([[0, 1, 257], [513, 2561, 65535]], dtype=np.uint16)
    # baseline * fx = 0.2 * 2000 = 400; d = (p - 1) / 256 = [-, 0, 1], [2, 10, 255.9921875]
    expected = np.array([[0.0, 0.0, 400.0], [200.0, 40.0, 1.5625477]], dtype=np.float32)
    np.testing.assert_allclose(disparity_to_depth(stored, 0.2, 2000.0), expected, rtol=1e-6)
    capped = disparity_to_depth(stored, 0.2, 2000.0, max_depth=80.0)
    np.testing.assert_allclose(capped, np.where(expected > 80.0, 0.0, expected), rtol=1e-6)


def test_the_decoder_reads_each_images_own_camera(tmp_path, data):
    label = data.format.tasks["depth"]
    camera = label.decoder_args["camera"]
    stored = np.array([[0, 2561, 5121]], dtype=np.uint16)  # d = 10 and 20 pixels
    depths = []
    for frame, (baseline, fx) in (("aachen_000000_000001", (0.2, 2000.0)), ("aachen_000000_000002", (0.25, 2400.0))):
        sample = _sample(tmp_path, stored.shape, frame=frame)
        _write(tmp_path, label.file, sample, stored)
        _write(tmp_path, camera, sample, camera=_camera(baseline, fx))
        depths.append(decode_label(sample, label))
    np.testing.assert_allclose(depths[0], [[0.0, 40.0, 20.0]], rtol=1e-6)
    np.testing.assert_allclose(depths[1], [[0.0, 60.0, 30.0]], rtol=1e-6)
    assert depths[0].dtype == np.float32


def test_missing_or_malformed_files_are_errors_that_name_the_file(tmp_path, data):
    label = data.format.tasks["depth"]
    camera = label.decoder_args["camera"]
    sample = _sample(tmp_path, (1, 3))
    with pytest.raises(FileNotFoundError, match=r"disparity map not found: .*aachen_000000_000019_disparity.png"):
        decode_label(sample, label)
    _write(tmp_path, label.file, sample, np.array([[0, 300, 600]], dtype=np.uint16))
    with pytest.raises(FileNotFoundError, match=r"camera file not found: .*aachen_000000_000019_camera.json"):
        decode_label(sample, label)
    _write(tmp_path, camera, sample, camera={"extrinsic": {"baseline": 0.2}, "intrinsic": {}})
    with pytest.raises(ValueError, match=r"_camera.json is not a Cityscapes camera file: .*intrinsic.fx"):
        decode_label(sample, label)
    _write(tmp_path, camera, sample, camera=_camera(0.2, 2000.0))
    _write(tmp_path, label.file, sample, np.array([[0, 30, 60]], dtype=np.uint8))
    with pytest.raises(ValueError, match="must be a 16-bit single-channel PNG"):
        decode_label(sample, label)


def test_the_decoder_arguments_are_checked(tmp_path, data):
    label = copy.deepcopy(data.format.tasks["depth"])
    sample = _sample(tmp_path, (1, 1))
    for args, message in (
        ({}, "needs decoder_args.camera"),
        ({"camera": label.decoder_args["camera"], "max_dept": 80}, r"unknown decoder_args \['max_dept'\]"),
        ({"camera": "camera/{split}/{town}/{frame}.json"}, r"field\(s\) \['town'\]"),
        ({"camera": label.decoder_args["camera"], "max_depth": -1}, "max_depth must be > 0"),
    ):
        label.decoder_args = args
        _write(tmp_path, label.file, sample, np.array([[300]], dtype=np.uint16))
        with pytest.raises(ValueError, match=message):
            decode_label(sample, label)


# ------------------------------------------------------------------------------------ the synthetic tree


def test_the_synthetic_tree_has_the_real_layout_and_reads_back_as_its_labels(tree, data):
    root = Path(tree.root)
    key = tree.samples["train"][0]
    city, frame = key.split("__")
    for path in (f"leftImg8bit/train/{city}/{frame}_leftImg8bit.png", f"gtFine/train/{city}/{frame}_gtFine_labelIds.png",
                 f"disparity/train/{city}/{frame}_disparity.png", f"camera/train/{city}/{frame}_camera.json"):  # fmt: skip
        assert (root / path).is_file(), path
    with Image.open(root / f"disparity/train/{city}/{frame}_disparity.png") as im:
        assert im.mode == "I;16"
    reader = get_reader("cityscapes", tree.root, fmt=data.format)
    max_depth = data.format.tasks["depth"].decoder_args["max_depth"]
    for split in ("train", "val"):
        assert reader.ids(split) == tree.samples[split]
        for key in tree.samples[split]:
            sample, truth = reader.read(key), tree.labels[key]
            assert sample["image"].shape == (*SIZE, 3)
            np.testing.assert_array_equal(sample["semseg"], truth["semseg"])
            near = (truth["depth"] > 0) & (truth["depth"] < 0.99 * max_depth)
            np.testing.assert_allclose(sample["depth"][near], truth["depth"][near], rtol=0.01)  # 1/256 px steps
            assert not sample["depth"][(truth["depth"] == 0) | (truth["depth"] > 1.01 * max_depth)].any()
            assert near.mean() > 0.5


def test_colour_tells_the_class_so_the_labels_are_learnable():
    def chroma(rgb):
        rgb = np.asarray(rgb, np.float64) + 1e-3
        return rgb / rgb.sum(-1, keepdims=True)

    label_ids = list(CITYSCAPES_TRAIN_IDS)
    palette = chroma(np.stack([CITYSCAPES_COLOURS[i] for i in label_ids]))
    for index in range(4):
        scene = cityscapes_scene(3, "train", index, "bochum", SIZE)
        nearest = np.argmin(((chroma(scene.image)[:, :, None] - palette) ** 2).sum(-1), axis=-1)
        predicted = np.array([CITYSCAPES_TRAIN_IDS[i] for i in label_ids])[nearest]
        labelled = scene.train_ids != 255
        assert (predicted[labelled] == scene.train_ids[labelled]).mean() > 0.9


# ------------------------------------------------------------------------------------ shards and batches


def test_converted_shards_describe_the_dataset(shards, tree):
    manifest = shards["manifests"]["train"]
    assert manifest["dataset"] == "cityscapes" and manifest["tasks"] == ["semseg", "depth"]
    assert manifest["num_outputs"] == {"semseg": 19, "depth": 1}
    assert manifest["class_names"]["semseg"][:3] == ["road", "sidewalk", "building"]
    assert manifest["num_samples"] == len(tree.samples["train"]) and manifest["optional_tasks"] == []


def test_a_training_batch_streams_from_the_shards(shards):
    loader = make_loader(shards["urls"]["train"], dataset="cityscapes", tasks=["semseg", "depth"], split="train",
                          img_size=(32, 64), batch_size=4)  # fmt: skip
    batch = next(iter(loader))
    loader.close()
    assert tuple(batch["image"].shape) == (4, 3, 32, 64)
    semseg, depth = batch["semseg"], batch["depth"]
    assert tuple(semseg.shape) == (4, 32, 64) and tuple(depth.shape) == (4, 32, 64)
    assert set(semseg.unique().tolist()) <= set(range(19)) | {255} and (semseg < 19).any()
    assert bool(depth.isfinite().all()) and (depth > 0).float().mean() > 0.3 and (depth >= 0).all()


def test_evaluation_sees_every_sample_once_at_its_own_size(shards, tree):
    loader = make_loader(shards["urls"]["val"], dataset="cityscapes", tasks=["semseg", "depth"], split="val",
                          img_size=(32, 64), batch_size=3)  # fmt: skip
    batches = list(loader)
    loader.close()
    keys = [k for batch in batches for k, v in zip(batch["__key__"], batch["valid"].tolist()) if v]
    assert sorted(keys) == tree.samples["val"]
    for batch in batches:
        assert set(map(tuple, batch["label_size"].tolist())) == {SIZE} and tuple(batch["semseg"].shape[-2:]) == SIZE


# --------------------------------------------------------------------------------------------- training


@pytest.mark.integration
def test_launch_train_runs_on_the_converted_shards_and_reports_miou_and_rmse(shards, tmp_path):
    run_dir = tmp_path / "run"
    urls = shards["urls"]
    run_script("train.py", ["data=cityscapes", f"data.train_url={urls['train']}", f"data.val_url={urls['val']}", "max_steps=3",
            *TINY_RUN, f"run_dir={run_dir}"], tmp_path)  # fmt: skip
    _, final = train_records(run_dir, 3, ["semseg", "depth"])
    assert final["step"] == 3
    assert 0.0 <= final["tasks"]["semseg"]["mIoU"] <= 100.0
    assert math.isfinite(final["tasks"]["depth"]["rmse"]) and final["tasks"]["depth"]["rmse"] > 0
