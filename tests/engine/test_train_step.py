"""The training step keeps losses on the device: no host sync per micro-batch, one per log step."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from mtlora_dist.engine import trainer
from mtlora_dist.engine.distributed import DistInfo
from mtlora_dist.tasks.losses import MultiTaskLoss

TASKS = ["semseg", "sal"]


class _Engine(nn.Module):
    """The three calls the loop makes on a DeepSpeed engine (forward, backward, step), on a tiny model."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({"semseg": nn.Conv2d(3, 5, 1), "sal": nn.Conv2d(3, 1, 1)})
        self.optimizer = torch.optim.SGD(self.parameters(), lr=0.1)

    def forward(self, image):
        return {t: head(image) for t, head in self.heads.items()}

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()


def _batches():
    g = torch.Generator().manual_seed(0)
    while True:
        yield {
            "image": torch.randn(2, 3, 8, 8, generator=g),
            "semseg": torch.randint(0, 5, (2, 8, 8), generator=g),
            "sal": torch.randint(0, 2, (2, 8, 8), generator=g).to(torch.uint8),
        }


@contextlib.contextmanager
def _count_host_reads(monkeypatch):
    """Counts the Tensor methods that copy a value to the host (each is a sync on an accelerator)."""
    calls = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    yield calls
    monkeypatch.undo()


@pytest.fixture
def step_inputs():
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return _Engine(), _batches(), MultiTaskLoss(TASKS, {t: 1.0 for t in TASKS}), info


def test_a_training_step_reads_nothing_back_to_the_host(monkeypatch, step_inputs):
    engine, batches, loss_fn, info = step_inputs
    with _count_host_reads(monkeypatch) as calls:
        losses = trainer._train_step(engine, batches, loss_fn, info, torch.float32, accumulation=3)
    assert calls == [], f"host reads in the step: {calls}"
    assert set(losses) == {"loss", *TASKS} and all(isinstance(v, torch.Tensor) for v in losses.values())


def test_log_values_are_the_micro_batch_means_in_one_read(monkeypatch, step_inputs):
    engine, batches, loss_fn, info = step_inputs
    losses = trainer._train_step(engine, batches, loss_fn, info, torch.float32, accumulation=2)
    expected = {k: float(v) for k, v in losses.items()}
    with _count_host_reads(monkeypatch) as calls:
        values = trainer._host_values(losses)
    assert calls == ["tolist"] and values == pytest.approx(expected)
    assert values["loss"] == pytest.approx(values["semseg"] + values["sal"], rel=1e-6)
