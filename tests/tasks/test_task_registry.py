"""The registry is the one source of task facts: weights, heads, losses, metrics, settings."""

from __future__ import annotations

import json

import pytest
from torch import nn

from mtlora_dist.tasks.losses import build_loss
from mtlora_dist.tasks.metrics import Metric, build_metric
from mtlora_dist.tasks.registry import (
    BUILTIN_DATASETS,
    BUILTIN_TASKS,
    DATASET_TASKS,
    TASKS,
    get_task,
    loss_weights,
    task_settings,
)


def test_default_weights_are_part_b_5():
    expected = {"semseg": 1, "human_parts": 2, "sal": 5, "normals": 10, "edge": 50, "depth": 1}  # spec B §5
    assert {t: TASKS[t].loss_weight for t in BUILTIN_TASKS} == expected


def test_head_widths():
    assert get_task("semseg").outputs_for("pascal_context") == 21
    assert get_task("semseg").outputs_for("nyud") == 40
    assert get_task("human_parts").outputs_for("pascal_context") == 7
    with pytest.raises(ValueError, match="it provides"):
        get_task("human_parts").outputs_for("nyud")


@pytest.mark.parametrize("dataset", sorted(BUILTIN_DATASETS))
def test_every_task_builds_its_loss_and_metric(dataset):
    for task in DATASET_TASKS[dataset]:
        assert isinstance(build_loss(task), nn.Module)
        assert isinstance(build_metric(task, dataset), Metric)


def test_edge_loss_and_metric_share_pos_weight():
    assert build_loss("edge").pos_weight == 0.95
    assert build_metric("edge", "pascal_context").pos_weight == 0.95
    assert build_loss("sal").pos_weight is None  # beta from the batch


def test_task_settings_plain_dict_with_override():
    settings = task_settings(["semseg", "normals"], "pascal_context", weights_override={"normals": 3.5})
    json.dumps(settings)  # plain, serialisable
    assert settings["normals"]["weight"] == 3.5
    assert settings["semseg"]["weight"] == 1.0
    assert settings["semseg"]["num_outputs"] == 21 and settings["semseg"]["ignore_index"] == 255
    assert settings["normals"]["primary_metric"] == "mean" and settings["normals"]["higher_is_better"] is False


def test_override_of_untrained_task_is_an_error():
    with pytest.raises(ValueError, match="not trained"):
        loss_weights(["semseg"], {"sal": 2.0})


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid tasks"):
        get_task("segm")
    with pytest.raises(ValueError, match=r"known datasets: \[.*'nyud'.*format:"):
        task_settings(["semseg"], "no_such_dataset")
