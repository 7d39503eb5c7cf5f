"""The synthetic generator: deterministic, varied sizes, and labels that the image really shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from mtlora_dist.data.ingest.formats import get_reader
from mtlora_dist.synthetic.datasets import ensure_synthetic, generate, make_scene

from datatest_utils import PASCAL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_scenes_are_deterministic_by_seed():
    for dataset in ("pascal_context", "nyud"):
        a, b = make_scene(dataset, 7, "train", 3, 64), make_scene(dataset, 7, "train", 3, 64)
        np.testing.assert_array_equal(a.image, b.image)
        for task, label in a.labels().items():
            np.testing.assert_array_equal(label, b.labels()[task])
        c = make_scene(dataset, 8, "train", 3, 64)
        assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)


def test_sizes_vary_and_are_not_square():
    shapes = {make_scene("pascal_context", 0, "train", i, 112).image.shape[:2] for i in range(12)}
    assert len(shapes) >= 8
    assert all(84 <= h <= 112 and 95 <= w <= 129 for h, w in shapes)
    assert sum(h != w for h, w in shapes) >= len(shapes) - 1


def test_cli_writes_the_layout_and_marker(tmp_path):
    root = str(tmp_path / "ny")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtlora_dist.synthetic.datasets",
            "--dataset",
            "nyud",
            "--root",
            root,
            "--num-train",
            "3",
            "--num-val",
            "2",
            "--seed",
            "5",
            "--size",
            "48",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    marker = json.load(open(os.path.join(root, "SYNTHETIC.json")))
    assert marker == {"dataset": "nyud", "num_train": 3, "num_val": 2, "seed": 5, "size": 48}
    reader = get_reader("nyud", root)
    assert len(reader.ids("train")) == 3 and len(reader.ids("val")) == 2
    reader.read(reader.ids("val")[1])


def test_ensure_synthetic_generates_once(tmp_path):
    root = str(tmp_path / "pc")
    assert ensure_synthetic("pascal_context", root, 2, 1, seed=1, size=40)
    stamp = os.path.getmtime(os.path.join(root, "JPEGImages", "2008_000000.jpg"))
    assert not ensure_synthetic("pascal_context", root, 2, 1, seed=1, size=40)
    assert os.path.getmtime(os.path.join(root, "JPEGImages", "2008_000000.jpg")) == stamp
    assert ensure_synthetic("pascal_context", root, 3, 1, seed=1, size=40)  # different request: regenerate
    assert len(get_reader("pascal_context", root).ids("train")) == 3


def _chroma(image: np.ndarray) -> np.ndarray:
    rgb = image.astype(np.float32) + 1.0
    return rgb / rgb.sum(-1, keepdims=True)


def _nearest_centroid_accuracy(reader, task: str, ignore: tuple[int, ...] = (255,)) -> float:
    """Fit per-class mean chromaticity on train images, score pixel accuracy on val images."""
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for sample_id in reader.ids("train"):
        s = reader.read(sample_id)
        chroma, label = _chroma(s["image"]), s[task]
        for c in np.unique(label):
            if c in ignore:
                continue
            m = label == c
            sums[c] = sums.get(c, 0) + chroma[m].sum(0)
            counts[c] = counts.get(c, 0) + int(m.sum())
    classes = sorted(sums)
    centroids = np.stack([sums[c] / counts[c] for c in classes])
    correct = total = 0
    for sample_id in reader.ids("val"):
        s = reader.read(sample_id)
        label = s[task]
        keep = ~np.isin(label, ignore)
        d = ((_chroma(s["image"])[keep][:, None, :] - centroids[None]) ** 2).sum(-1)
        pred = np.array(classes)[d.argmin(1)]
        correct += int((pred == label[keep]).sum())
        total += int(keep.sum())
    return correct / total


def test_classes_and_parts_are_visible_in_the_colours(pascal_root):
    """A pixel's colour alone (no context) predicts its class and body part: the data is learnable."""
    reader = get_reader("pascal_context", pascal_root)
    assert _nearest_centroid_accuracy(reader, "semseg") > 0.8
    assert _nearest_centroid_accuracy(reader, "human_parts", ignore=(0, 255)) > 0.8  # on people


def test_normals_are_visible_in_the_shading(pascal_root):
    """Within one surface class, brightness follows the Lambertian term of the labelled normals."""
    reader = get_reader("pascal_context", pascal_root, ["semseg", "normals"])
    light = np.array([-0.5, -0.6, 1.0]) / np.linalg.norm([-0.5, -0.6, 1.0])
    correlations = []
    for sample_id in reader.ids("train")[:8]:
        s = reader.read(sample_id)
        valid = np.linalg.norm(s["normals"], axis=-1) > 0
        for c in np.unique(s["semseg"][valid]):
            m = valid & (s["semseg"] == c)
            if m.sum() < 200:
                continue
            lambert = np.clip(s["normals"][m] @ light, 0, 1)
            brightness = s["image"][m].astype(np.float32).sum(-1)
            if lambert.std() > 0.02:
                correlations.append(np.corrcoef(lambert, brightness)[0, 1])
    assert len(correlations) >= 5 and np.median(correlations) > 0.5


def test_generate_is_reproducible_on_disk(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    generate("pascal_context", a, 3, 0, seed=PASCAL["seed"], size=48)
    generate("pascal_context", b, 3, 0, seed=PASCAL["seed"], size=48)
    ra, rb = get_reader("pascal_context", a), get_reader("pascal_context", b)
    for sample_id in ra.ids("train"):
        sa, sb = ra.read(sample_id), rb.read(sample_id)
        for key in sa:
            if key != "__key__":
                np.testing.assert_array_equal(sa[key], sb[key])
        with open(ra.image_path(sample_id), "rb") as fa, open(rb.image_path(sample_id), "rb") as fb:
            assert fa.read() == fb.read()


def test_pascal_labelmaps_use_the_real_459_class_ids(pascal_root):
    """The LabelMaps hold real PASCAL-Context ids (so the real db_info lists apply): a few from the
    dataset's labels.txt, every written id among the generator's table, and db_info naming them so."""
    import scipy.io

    from mtlora_dist.synthetic.datasets import CONTEXT_IDS, context_id

    real = {"wall": 440, "floor": 158, "sky": 360, "person": 284, "tvmonitor": 427, "table": 397, "chair": 72}
    assert {name: CONTEXT_IDS[name] for name in real} == real
    assert context_id("diningtable") == 397 and context_id("aeroplane") == 2
    assert len(set(CONTEXT_IDS.values())) == len(CONTEXT_IDS) and max(CONTEXT_IDS.values()) <= 459
    seen: set[int] = set()
    for sample_id in get_reader("pascal_context", pascal_root).ids("train"):
        mat = scipy.io.loadmat(os.path.join(pascal_root, "pascal-context", "trainval", f"{sample_id}.mat"))
        seen |= set(np.unique(mat["LabelMap"]).tolist())
    assert seen <= set(CONTEXT_IDS.values()) and 158 in seen and seen & {440, 360}  # floor, wall or sky
    with open(os.path.join(pascal_root, "db_info", "context_classes.json")) as f:
        assert json.load(f) == CONTEXT_IDS
