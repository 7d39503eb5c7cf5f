"""A dataset of one's own, as a user would bring it: files on disk plus a data config declaring them.

Three label kinds: ``semseg`` (a class map stored with ids 0/10/20/99, mapped to 3 classes, 99 unlabelled),
``road`` (a new task: a binary mask, optional, so some samples lack it) and ``height`` (a new task: a 16-bit
scalar in millimetres, 0 = no measurement). The labels follow the image, so a model can learn them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

NAME = "street_demo"
TASKS = ["semseg", "road", "height"]
SIZE = (40, 56)  # (H, W)

DATA_CONFIG = f"""\
# A dataset of one's own (tests/declared_data.py)
dataset: {NAME}
tasks: [semseg, road, height]
train_url: null
val_url: null
batch_size: 4
eval_batch_size: 4
num_workers: 0
format:
  image: images/{{split}}/{{scene}}/{{frame}}.jpg
  tasks:
    semseg:
      kind: class_map
      file: labels/{{split}}/{{scene}}/{{frame}}_ids.png
      num_classes: 3
      ignore_value: 99
      id_map: {{0: 0, 10: 1, 20: 2}}
      class_names: [sky, building, ground]
    road:
      kind: binary_map
      file: road/{{split}}/{{scene}}/{{frame}}.png
      optional: true
    height:
      kind: scalar
      file: height/{{split}}/{{scene}}/{{frame}}.png
      units: m
      scale: 0.001
      invalid_value: 0
  baselines: {{semseg: 40.0, road: 50.0, height: 2.0}}
"""


def make_tree(root: str | Path, counts: dict[str, int], seed: int = 0, road_missing_every: int = 0) -> Path:
    """Write ``counts[split]`` samples per split under ``root`` (two scenes); every ``road_missing_every``-th
    sample of a split has no road file (0: all have one). Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = SIZE
    rows = np.arange(h)[:, None].repeat(w, axis=1)
    for split, n in counts.items():
        for i in range(n):
            scene, frame = f"scene{i % 2}", f"f{i:04d}"
            horizon = int(rng.integers(h // 4, 3 * h // 4))
            ids = np.where(rows < horizon, 0, np.where(rows < horizon + 4, 10, 20)).astype(np.uint8)
            ids[:2, :2] = 99  # a few unlabelled pixels
            image = np.stack([ids * 8 + 40, 200 - ids * 6, 90 + ids * 3], axis=-1).astype(np.float64)
            image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
            road = (ids == 20) & (np.arange(w)[None, :] > w // 3)
            height = np.where(rows >= horizon, 1000 + 60 * (rows - horizon), 0).astype(np.uint16)
            files = {
                f"images/{split}/{scene}/{frame}.jpg": image,
                f"labels/{split}/{scene}/{frame}_ids.png": ids,
                f"height/{split}/{scene}/{frame}.png": height,
            }
            if not (road_missing_every and i % road_missing_every == road_missing_every - 1):
                files[f"road/{split}/{scene}/{frame}.png"] = road.astype(np.uint8) * 255
            for rel, array in files.items():
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path, quality=95) if rel.endswith(".jpg") else Image.fromarray(array).save(
                    path
                )
    return root


def write_configs(folder: str | Path) -> Path:
    """A recipe folder a user would write: ``<folder>/recipe.yaml`` (the quickstart's groups with ``data:
    street_demo``) and ``<folder>/data/street_demo.yaml``. Returns the recipe's path."""
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / f"{NAME}.yaml").write_text(DATA_CONFIG)
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        "defaults:\n  - mtlora_schema\n  - model: tiny\n  - adapter: tiny\n"
        f"  - data: {NAME}\n  - optim: quickstart\n  - deepspeed: zero2\n  - logging: default\n  - _self_\n"
        "run_dir: runs/street_demo\nseed: 0\nmax_steps: 2\n"
    )
    return recipe
