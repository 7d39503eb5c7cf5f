"""Readers of the on-disk layouts (Part B §8), run on synthetic data written in those layouts."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import scipy.io
from PIL import Image

from mtlora_dist.data.ingest.convert import convert
from mtlora_dist.data.ingest.formats import get_reader
from mtlora_dist.data.ingest.formats.base import resize_label
from mtlora_dist.data.ingest.formats.pascal_context import normals_valid_classes, read_human_parts
from mtlora_dist.data.ingest.labels import HUMAN_PART, PERSON_CLASS
from mtlora_dist.synthetic.datasets import make_scene

from datatest_utils import NYUD, PASCAL


def pascal_files(root: str, i: str) -> list[str]:
    return [
        f"JPEGImages/{i}.jpg",
        f"pascal-context/trainval/{i}.mat",
        f"semseg/VOC12/{i}.png",
        f"human_parts/{i}.mat",
        f"normals_distill/{i}.png",
        f"sal_distill/{i}.png",
    ]


def test_pascal_layout_is_where_part_b_says(pascal_root):
    reader = get_reader("pascal_context", pascal_root)
    for split, n in (("train", PASCAL["num_train"]), ("val", PASCAL["num_val"])):
        ids = reader.ids(split)
        assert len(ids) == n and len(set(ids)) == n
        for i in ids:
            for rel in pascal_files(pascal_root, i):
                assert os.path.isfile(os.path.join(pascal_root, rel)), rel
        parts = json.load(open(os.path.join(pascal_root, "ImageSets", "Parts", f"{split}.txt")))
        assert sorted(parts) == sorted(ids)
    assert not set(reader.ids("train")) & set(reader.ids("val"))


def test_pascal_reader_returns_the_scene_labels(pascal_root):
    reader = get_reader("pascal_context", pascal_root)
    for index, sample_id in enumerate(reader.ids("train")):
        sample = reader.read(sample_id)
        scene = make_scene("pascal_context", PASCAL["seed"], "train", index, PASCAL["size"])
        truth = scene.labels()
        assert sample["__key__"] == sample_id
        assert sample["image"].dtype == np.uint8 and sample["image"].shape == scene.image.shape
        assert np.abs(sample["image"].astype(int) - scene.image).mean() < 6  # JPEG q95
        for task in ("semseg", "human_parts", "sal", "edge"):
            assert sample[task].dtype == np.uint8
            np.testing.assert_array_equal(sample[task], truth[task], err_msg=f"{sample_id} {task}")
        n = sample["normals"]
        assert n.dtype == np.float32 and n.shape == scene.image.shape
        valid = np.linalg.norm(n, axis=-1) > 0
        np.testing.assert_array_equal(valid, scene.normals_valid)
        assert np.abs(np.linalg.norm(n[valid], axis=-1) - 1).max() < 1e-5
        assert np.abs(n - truth["normals"]).max() < 0.01  # 8-bit PNG quantisation


def test_pascal_mat_files_decode_to_the_intended_labels(pascal_root):
    reader = get_reader("pascal_context", pascal_root)
    seen_person = seen_no_person = 0
    for index, sample_id in enumerate(reader.ids("train")):
        scene = make_scene("pascal_context", PASCAL["seed"], "train", index, PASCAL["size"])
        labelmap = scipy.io.loadmat(os.path.join(pascal_root, "pascal-context", "trainval", f"{sample_id}.mat"))[
            "LabelMap"
        ]
        np.testing.assert_array_equal(labelmap, scene.region)
        anno = scipy.io.loadmat(os.path.join(pascal_root, "human_parts", f"{sample_id}.mat"))["anno"]
        assert anno.dtype.names == ("imname", "objects")
        objects = anno[0, 0]["objects"]
        assert objects.dtype.names == ("class", "class_ind", "mask", "parts")
        # official indexing (anno[0][0][1][0], obj[1][0][0] = class_ind, obj[3] = parts) still works
        for obj in anno[0][0][1][0]:
            if obj[1][0][0] == PERSON_CLASS and len(obj[3]):
                assert {str(p[0][0]) for p in obj[3][0]} <= set(HUMAN_PART)
        parts = read_human_parts(os.path.join(pascal_root, "human_parts", f"{sample_id}.mat"), labelmap.shape)
        if (scene.human_parts == 255).all():
            seen_no_person += 1
            assert (parts == 255).all()
        else:
            seen_person += 1
            assert set(np.unique(parts)) <= set(range(7))
        np.testing.assert_array_equal(parts, scene.human_parts)
    assert seen_person and seen_no_person, "the synthetic set must have images with and without people"


def test_human_parts_use_person_parts_only(tmp_path):
    """Parts of other objects are ignored; a person without part annotations gives no supervision."""
    h, w = 6, 8
    cat_mask = np.zeros((h, w), np.uint8)
    cat_mask[:3] = 1
    obj_dtype = [("class", object), ("class_ind", object), ("mask", object), ("parts", object)]
    part_dtype = [("part_name", object), ("mask", object)]

    def anno(objects):
        records = np.zeros((1, len(objects)), dtype=obj_dtype)
        for k, (name, ind, mask, parts) in enumerate(objects):
            arr = np.zeros((0, 0))
            if parts:
                arr = np.zeros((1, len(parts)), dtype=part_dtype)
                for j, p in enumerate(parts):
                    arr[0, j] = p
            records[0, k] = (name, np.array([[ind]], np.uint8), mask, arr)
        return {"anno": {"imname": "x", "objects": records}}

    path = str(tmp_path / "a.mat")
    scipy.io.savemat(path, anno([("cat", 8, cat_mask, [("head", cat_mask)]), ("person", 15, cat_mask, [])]))
    assert (read_human_parts(path, (h, w)) == 255).all()

    legs = np.zeros((h, w), np.uint8)
    legs[4:, 2:4] = 1
    scipy.io.savemat(path, anno([("cat", 8, cat_mask, [("head", cat_mask)]), ("person", 15, legs, [("lfoot", legs)])]))
    parts = read_human_parts(path, (h, w))
    assert (parts[legs > 0] == HUMAN_PART["lfoot"]).all() and (parts[legs == 0] == 0).all()

    # official rule: a person whose part masks are all empty gives no supervision (255), not background
    empty = np.zeros((h, w), np.uint8)
    scipy.io.savemat(path, anno([("person", 15, legs, [("lfoot", empty), ("head", empty)])]))
    assert (read_human_parts(path, (h, w)) == 255).all()
    scipy.io.savemat(path, anno([("person", 15, legs, [("lfoot", empty)]), ("person", 15, legs, [("lfoot", legs)])]))
    parts = read_human_parts(path, (h, w))
    assert (parts[legs > 0] == HUMAN_PART["lfoot"]).all() and (parts[legs == 0] == 0).all()

    scipy.io.savemat(path, anno([("person", 15, legs, [("tail", legs)])]))
    with pytest.raises(ValueError, match="unknown person part 'tail'"):
        read_human_parts(path, (h, w))


def test_pascal_labels_of_another_size_are_resized_as_the_official_reader_does(pascal_root, tmp_path, caplog):
    """The official reader resizes a label whose size differs from its JPEG: OpenCV nearest for class maps,
    cubic for normals; each such sample is logged during conversion."""
    import cv2

    root = str(tmp_path / "pc")
    shutil.copytree(pascal_root, root)
    reader = get_reader("pascal_context", root, ["semseg", "sal", "normals"])
    sample_id = reader.ids("train")[0]
    before = reader.read(sample_id)
    h, w = before["image"].shape[:2]
    small = (w // 2 + 1, h // 2)  # cv2 sizes are (W, H)
    semseg_png = os.path.join(root, "semseg", "VOC12", f"{sample_id}.png")
    semseg_small = cv2.resize(np.asarray(Image.open(semseg_png)), small, interpolation=cv2.INTER_NEAREST)
    Image.fromarray(semseg_small).save(semseg_png)
    sal_png = os.path.join(root, "sal_distill", f"{sample_id}.png")
    Image.fromarray(cv2.resize(np.asarray(Image.open(sal_png)), small, interpolation=cv2.INTER_NEAREST)).save(sal_png)

    with caplog.at_level("WARNING", logger="mtlora_dist"):
        after = reader.read(sample_id)
    np.testing.assert_array_equal(after["semseg"], cv2.resize(semseg_small, (w, h), interpolation=cv2.INTER_NEAREST))
    assert after["sal"].shape == (h, w) and set(np.unique(after["sal"])) <= {0, 1}
    assert sum("label resized" in r.getMessage() for r in caplog.records) == 2  # semseg and sal, not normals

    with caplog.at_level("WARNING", logger="mtlora_dist"):
        caplog.clear()
        convert("pascal_context", root, "train", str(tmp_path / "shards"), shard_size_mb=1)
    assert (
        sum(f"sample {sample_id}:" in r.getMessage() and "label resized" in r.getMessage() for r in caplog.records) >= 2
    )


def test_resized_normals_stay_unit_vectors_with_the_invalid_mask_nearest():
    normals = np.zeros((8, 10, 3), np.float32)
    normals[:, 5:] = [0.0, 0.6, 0.8]
    resized = resize_label(normals, (16, 20), "normals")
    valid = np.linalg.norm(resized, axis=-1) > 0
    np.testing.assert_array_equal(valid, np.repeat(np.repeat(normals[..., 2] > 0, 2, 0), 2, 1))
    assert np.abs(np.linalg.norm(resized[valid], axis=-1) - 1).max() < 1e-5


def test_normals_mask_follows_db_info(pascal_root):
    valid_ids = normals_valid_classes(os.path.join(pascal_root, "db_info"))
    context = json.load(open(os.path.join(pascal_root, "db_info", "context_classes.json")))
    assert context["tvmonitor"] in valid_ids and context["sky"] not in valid_ids
    reader = get_reader("pascal_context", pascal_root, ["normals"])
    sample_id = reader.ids("val")[0]
    labelmap = scipy.io.loadmat(os.path.join(pascal_root, "pascal-context", "trainval", f"{sample_id}.mat"))["LabelMap"]
    n = reader.read(sample_id)["normals"]
    np.testing.assert_array_equal(np.linalg.norm(n, axis=-1) > 0, np.isin(labelmap, valid_ids))


def test_pascal_reader_fallbacks_and_errors(pascal_root, tmp_path):
    root = str(tmp_path / "pc")
    shutil.copytree(pascal_root, root)
    reader = get_reader("pascal_context", root, ["semseg"])
    sample_id = reader.ids("train")[0]
    expected = reader.read(sample_id)["semseg"]
    os.makedirs(os.path.join(root, "semseg", "pascal-context"))
    shutil.move(
        os.path.join(root, "semseg", "VOC12", f"{sample_id}.png"),
        os.path.join(root, "semseg", "pascal-context", f"{sample_id}.png"),
    )
    np.testing.assert_array_equal(reader.read(sample_id)["semseg"], expected)

    shutil.rmtree(os.path.join(root, "db_info"))
    with pytest.raises(FileNotFoundError, match="context_classes.json"):
        get_reader("pascal_context", root, ["normals"]).read(sample_id)
    get_reader("pascal_context", root, ["sal"]).read(sample_id)  # no db_info needed without normals

    os.remove(os.path.join(root, "sal_distill", f"{sample_id}.png"))
    with pytest.raises(FileNotFoundError, match="saliency label not found"):
        get_reader("pascal_context", root, ["sal"]).read(sample_id)
    with pytest.raises(ValueError, match="has no task"):
        get_reader("pascal_context", root, ["depth"])
    with pytest.raises(FileNotFoundError, match="split file for 'test'"):
        reader.ids("test")


def test_nyud_reader_shifts_classes_and_keeps_metric_depth(nyud_root):
    reader = get_reader("nyud", nyud_root)
    assert reader.tasks == ("semseg", "depth", "normals", "edge")
    for split, count in (("train", NYUD["num_train"]), ("val", NYUD["num_val"])):
        ids = reader.ids(split)
        assert len(ids) == count
        for index, sample_id in enumerate(ids):
            for rel in (
                f"images/{sample_id}.jpg",
                f"segmentation/{sample_id}.png",
                f"depth/{sample_id}.npy",
                f"normals/{sample_id}.npy",
                f"edge/{sample_id}.npy",
            ):
                assert os.path.isfile(os.path.join(nyud_root, rel)), rel
            sample = reader.read(sample_id)
            scene = make_scene("nyud", NYUD["seed"], split, index, NYUD["size"])
            stored = np.asarray(Image.open(os.path.join(nyud_root, "segmentation", f"{sample_id}.png")))
            np.testing.assert_array_equal(sample["semseg"], np.where(stored == 0, 255, stored.astype(int) - 1))
            np.testing.assert_array_equal(sample["semseg"], scene.semseg)
            assert sample["semseg"][sample["semseg"] != 255].max() <= 39
            np.testing.assert_array_equal(sample["depth"], scene.depth)
            assert (sample["depth"] == 0).any() and sample["depth"].max() < 10  # holes, metres
            np.testing.assert_allclose(sample["normals"], scene.normals, atol=1e-5)
            np.testing.assert_array_equal(sample["edge"], scene.edge)


def test_label_size_must_match_image(nyud_root, tmp_path):
    root = str(tmp_path / "ny")
    shutil.copytree(nyud_root, root)
    reader = get_reader("nyud", root, ["depth"])
    sample_id = reader.ids("train")[0]
    np.save(os.path.join(root, "depth", f"{sample_id}.npy"), np.ones((5, 5), np.float32))
    with pytest.raises(ValueError, match="labels must have the image's size"):
        reader.read(sample_id)
