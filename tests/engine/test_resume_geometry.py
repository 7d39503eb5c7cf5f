"""The resume's choice of gradient accumulation (in process; ``tests/checkpoint/test_resume_world.py`` runs it
through ``launch/train.py`` on real ranks)."""

from __future__ import annotations

import logging

import pytest
from runs import QUICKSTART

from mtlora_dist.checkpoint.format import CheckpointError
from mtlora_dist.config import load_config
from mtlora_dist.engine.train_state import SavedBatch, fit_saved_global_batch, world_sizes_for

SAVED = SavedBatch("runs/x/checkpoints/step_00000040", 40, 4, 16, 0, 40)  # global batch 16 on 4 ranks


def config(*overrides: str):
    return load_config(QUICKSTART, ["data.batch_size=4", *overrides])


def test_the_accumulation_that_keeps_the_global_batch_is_chosen_and_said_once(caplog):
    cfg = config()
    with caplog.at_level(logging.INFO, logger="mtlora_dist"):
        fit_saved_global_batch(cfg, 2, SAVED)
    assert cfg.deepspeed.gradient_accumulation_steps == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "gradient accumulation 1 -> 2 keeps the global batch 16" in lines[0]
    same = config("deepspeed.gradient_accumulation_steps=4")
    fit_saved_global_batch(same, 1, SAVED)  # already 16: nothing to say or change
    assert same.deepspeed.gradient_accumulation_steps == 4
    fit_saved_global_batch(same, 3, None)  # a fresh run (or an import: no data position)
    assert same.deepspeed.gradient_accumulation_steps == 4


def test_a_world_size_that_cannot_make_it_is_refused_naming_those_that_can_and_the_override(caplog):
    with pytest.raises(CheckpointError) as err:
        fit_saved_global_batch(config(), 3, SAVED)
    text = str(err.value)
    assert "\n" not in text and "global batch 16" in text and "on 3 ranks" in text
    assert "world sizes that can: 1, 2, 4" in text and "checkpoint.change_global_batch=true" in text
    with pytest.raises(CheckpointError, match="none with data.batch_size=5"):
        fit_saved_global_batch(config("data.batch_size=5"), 1, SAVED)

    cfg = config("checkpoint.change_global_batch=true", "optim.lr_scaling=linear")
    with caplog.at_level(logging.INFO, logger="mtlora_dist"):
        fit_saved_global_batch(cfg, 3, SAVED)
    assert cfg.deepspeed.gradient_accumulation_steps == 1  # this run's own global batch: 4 x 1 x 3
    [line] = [r.getMessage() for r in caplog.records]
    assert "global batch 16 -> 12" in line and "optim.lr_scaling=linear" in line


def test_world_sizes_for():
    assert world_sizes_for(16, 4) == [1, 2, 4]
    assert world_sizes_for(32768, 128)[-3:] == [64, 128, 256]
    assert world_sizes_for(16, 5) == []


def test_a_resume_takes_the_schedules_position_never_its_learning_rates(caplog):
    """4 -> 3 ranks at global batch 16 -> 12 under lr_scaling=linear: after the restore the lr is the new
    recipe's at the saved step (the issue's 5.78e-5 kept from 16/512 was the restored number)."""
    import torch

    from mtlora_dist.checkpoint.trainable import restore_schedule_position
    from mtlora_dist.engine.optim import build_optimizer

    cfg = config("optim.lr_scaling=linear")

    def schedule(global_batch: int, steps: int):
        optimizer, sched = build_optimizer(torch.nn.Linear(2, 2), cfg.optim, global_batch, 100, 10)
        for _ in range(steps):
            optimizer.step()
            sched.step()
        return optimizer, sched

    _, old = schedule(16, 3)
    saved = old.state_dict()
    optimizer, new = schedule(12, 0)
    with caplog.at_level(logging.INFO, logger="mtlora_dist"):
        restore_schedule_position(new, optimizer.param_groups, saved)
    _, straight = schedule(12, 3)
    assert new.last_epoch == 3 and new.get_last_lr() == straight.get_last_lr()
    assert [g["lr"] for g in optimizer.param_groups] == straight.get_last_lr()
    assert new.get_last_lr()[0] == pytest.approx(old.get_last_lr()[0] * 12 / 16)
    [line] = [r.getMessage() for r in caplog.records]
    assert "learning rates recomputed" in line
    caplog.clear()
    optimizer, same = schedule(16, 0)
    with caplog.at_level(logging.INFO, logger="mtlora_dist"):
        restore_schedule_position(same, optimizer.param_groups, saved)
    assert same.get_last_lr() == old.get_last_lr() and not caplog.records  # the same recipe: nothing to say
