"""One table of (backbone, adapter, tasks) cases drives every generic model test, as HF PEFT's
``test_custom_models.py`` does: forward shapes, gradient coverage, merged = unmerged, export round trip
and checkpoint round trip. A new adapter mode or backbone variant is one row of ``CASES``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from mtlora_dist.adapters import AdapterConfig, mtlora_layers
from mtlora_dist.checkpoint import Checkpointer, SavePolicy
from mtlora_dist.export import ModelSpec, StackedLinear, load, save, to_inference
from mtlora_dist.export.merge import output_difference
from mtlora_dist.models import ModelConfig
from mtlora_dist.models.trainable import TrainableConfig
from mtlora_dist.storage import atomic
from mtlora_dist.tasks.registry import get_task

from factories import PAPER_TASKS, randomize_lora, tiny_model, tiny_model_config

TA_WITH_PATCH_MERGING = [
    "layers.*.blocks.*.attn.qkv",
    "layers.*.blocks.*.attn.proj",
    "layers.*.blocks.*.mlp.fc1",
    "layers.*.blocks.*.mlp.fc2",
    "layers.*.downsample.reduction",
]


@dataclass
class Case:
    name: str
    adapter: AdapterConfig
    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS))
    dataset: str = "pascal_context"
    model: ModelConfig = field(default_factory=tiny_model_config)

    def build(self) -> torch.nn.Module:
        return randomize_lora(tiny_model(self.adapter, self.tasks, self.dataset, self.model), batchnorm=True)

    def spec(self) -> ModelSpec:
        return ModelSpec(self.model, self.adapter, TrainableConfig(), self.tasks, self.dataset)

    def images(self) -> torch.Tensor:
        h, w = self.model.img_size
        return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))


def _adapter(**kw) -> AdapterConfig:
    return AdapterConfig(**{"shared_rank": 8, "task_rank": 4, "dropout": 0.0, **kw})


CASES = [
    Case("matrix", _adapter(mode="matrix")),
    Case("matrixv2", _adapter(mode="matrixv2")),
    Case("addition", _adapter(mode="addition")),
    Case("lora_only", _adapter(mode="lora_only")),
    Case(
        "per-task ranks and scales",
        _adapter(
            shared_rank=[4, 4, 8, 8],
            trainable_scale_per_task=True,
            task_rank={"semseg": 2, "human_parts": 4, "sal": 3, "normals": 1},
            task_scale={"semseg": 1.0, "human_parts": 2.0, "sal": 3.0, "normals": 0.5},
        ),
    ),
    Case("MTLoRA+ (patch merging)", _adapter(ta_targets=TA_WITH_PATCH_MERGING)),
    Case("NYUD tasks", _adapter(), tasks=["semseg", "depth", "normals", "edge"], dataset="nyud"),
    Case(
        "shallow Swin (1-2-1-1), 96 px",
        _adapter(),
        model=tiny_model_config(96, backbone_kwargs={"depths": (1, 2, 1, 1)}),
    ),
]
pytestmark = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


def test_forward_gives_every_task_its_map(case):
    outputs = case.build().eval()(case.images())
    h, w = case.model.img_size
    assert {t: tuple(o.shape) for t, o in outputs.items()} == {
        t: (2, get_task(t).outputs_for(case.dataset), h, w) for t in case.tasks
    }
    assert all(torch.isfinite(o).all() for o in outputs.values())


def test_every_trainable_parameter_gets_a_gradient_and_no_frozen_one_does(case):
    model = case.build().train()
    sum(o.float().square().mean() for o in model(case.images()).values()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None] == []


@pytest.mark.parametrize("fold_task_proj", [False, True], ids=["default", "fold_task_proj"])
def test_merged_model_equals_the_adapted_model(case, fold_task_proj):
    model = case.build().eval()
    merged = copy.deepcopy(model)
    summary = to_inference(merged, fold_task_proj=fold_task_proj)
    assert max(output_difference(model, merged, case.images()).values()) < 1e-5

    assert summary.batchnorm_folded == len(case.tasks)
    left = mtlora_layers(merged)
    assert sorted(left) == summary.adapters_left
    assert all(layer.tasks for layer in left.values()), "a layer without task branches was left unmerged"
    stacked = [m for m in merged.modules() if isinstance(m, StackedLinear)]
    expected = 4 if fold_task_proj and case.adapter.mode not in ("addition", "lora_only") else 0  # a TS proj per stage
    assert len(stacked) == summary.task_proj_folded == expected


@pytest.mark.parametrize("fold_task_proj", [False, True], ids=["default", "fold_task_proj"])
def test_export_round_trip(case, fold_task_proj, tmp_path):
    model = case.build().eval()
    summary = to_inference(model, fold_task_proj=fold_task_proj)
    loaded = load(save(model, case.spec(), summary, str(tmp_path)))
    assert loaded.summary == summary and list(loaded.img_size) == list(case.model.img_size)
    with torch.no_grad():
        expected, got = model(case.images()), loaded(case.images())
    assert all(torch.equal(expected[t], got[t]) for t in case.tasks)
    for name in ("model.safetensors", "export.json"):  # shareable like any new file, not mkstemp's 0600
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK, name
    (tmp_path / "model.safetensors").write_bytes(b"not the exported weights")
    with pytest.raises(ValueError, match="sha256"):
        load(str(tmp_path))


def _engine(model: torch.nn.Module):
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10_000,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-2), config=config)
    return engine


def test_checkpoint_round_trip(case, tmp_path, single_rank_group):
    """Train a step through DeepSpeed (ZeRO-2), save; a differently initialised model resumes to the same
    trainable weights and outputs."""
    engine = _engine(case.build().train())
    images = case.images()
    loss = sum(F.mse_loss(o.float(), torch.zeros_like(o, dtype=torch.float32)) for o in engine(images).values())
    engine.backward(loss)
    engine.step()
    Checkpointer(str(tmp_path), engine, policy=SavePolicy(0, 1), fingerprint={"case": case.name}).save(1)

    fresh = randomize_lora(tiny_model(case.adapter, case.tasks, case.dataset, case.model), seed=5)  # same backbone
    restored = _engine(fresh.train())
    assert Checkpointer(str(tmp_path), restored, policy=SavePolicy(0, 1), fingerprint={"case": case.name}).resume() == 1
    for (name, a), b in zip(engine.module.named_parameters(), restored.module.parameters()):
        assert torch.equal(a, b), name
    engine.module.eval(), restored.module.eval()
    with torch.no_grad():
        expected, got = engine(images), restored(images)
    assert all(torch.equal(expected[t], got[t]) for t in case.tasks)
