"""The paper recipes train with the official MTLoRA recipe (issue 27): the lr of every optimizer step
and the weight-decay split are computed here from the official code's own rules (timm's
CosineLRScheduler driven as its ``train_one_epoch`` drives it; its ``set_weight_decay``), not copied."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from mtlora_dist.config import PACKAGE_CONFIGS, load_config
from mtlora_dist.data.config import BatchGeometry
from mtlora_dist.engine.deepspeed_setup import deepspeed_config
from mtlora_dist.engine.optim import build_optimizer, no_decay_names, warmup_length
from mtlora_dist.models import build_model
from mtlora_dist.tasks import loss_weights

# The official PASCAL-Context run (its config defaults and MTLoRA's PASCAL yaml): 300 epochs, 20 of them
# warmup, lrs before scaling by global batch / 512, AdamW's settings, clipping and the loss weights.
OFFICIAL = {
    "epochs": 300,
    "warmup_epochs": 20,
    "base_lr": 5e-4,
    "warmup_lr": 5e-7,
    "min_lr": 5e-6,
    "weight_decay": 0.05,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "clip_grad": 5.0,
    "loss_weights": {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0},
}
PAPER_RECIPES = ["pascal_swin_t_r16", "pascal_swin_t_r32", "pascal_swin_t_r64", "pascal_swin_b", "pascal_swin_l"]
STEPS_PER_EPOCH = 156  # 4,998 training images at a global batch of 32, drop_last
GLOBAL_BATCH = 32


def _recipe(name: str):
    return load_config(os.path.join(PACKAGE_CONFIGS, f"{name}.yaml"))


def official_lrs(steps_per_epoch: int, epochs: int, global_batch: int, warmup_epochs: int) -> list[float]:
    """The lr each optimizer step runs at in the official code: its ``build_scheduler`` and
    ``step_update(epoch * num_steps + idx)`` after every ``optimizer.step()``."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    scale = global_batch / 512
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=OFFICIAL["base_lr"] * scale)
    num_steps = int(epochs * steps_per_epoch)
    warmup = int(warmup_epochs * steps_per_epoch)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=num_steps - warmup,
        cycle_mul=1.0,  # the official t_mul, renamed in timm
        lr_min=OFFICIAL["min_lr"] * scale,
        warmup_lr_init=OFFICIAL["warmup_lr"] * scale,
        warmup_t=warmup,
        cycle_limit=1,
        t_in_epochs=False,
        warmup_prefix=True,
    )
    lrs = []
    for epoch in range(epochs):
        for idx in range(steps_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])  # what optimizer.step() uses
            scheduler.step_update(epoch * steps_per_epoch + idx)
    return lrs


def our_lrs(optimizer, scheduler, steps: int) -> list[list[float]]:
    """Every group's lr at each optimizer step, stepping the schedule as DeepSpeed does (after the step)."""
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no optimizer.step() here: only the schedule is wanted
        for _ in range(steps):
            lrs.append([g["lr"] for g in optimizer.param_groups])
            scheduler.step()
    return lrs


@pytest.fixture(scope="module")
def r64():
    cfg = _recipe("pascal_swin_t_r64")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    return cfg, model


def test_r64_recipe_runs_every_step_at_the_official_lr(r64):
    cfg, model = r64
    total = OFFICIAL["epochs"] * STEPS_PER_EPOCH
    optimizer, scheduler = build_optimizer(model, cfg.optim, GLOBAL_BATCH, total, STEPS_PER_EPOCH)
    assert warmup_length(cfg.optim, total, STEPS_PER_EPOCH) == OFFICIAL["warmup_epochs"] * STEPS_PER_EPOCH
    expected = official_lrs(STEPS_PER_EPOCH, OFFICIAL["epochs"], GLOBAL_BATCH, OFFICIAL["warmup_epochs"])
    ours = our_lrs(optimizer, scheduler, total)
    assert ours[0][0] == ours[1][0] == pytest.approx(expected[0], rel=1e-12)  # steps 0 and 1 at warmup_lr_init
    for step, (groups, want) in enumerate(zip(ours, expected)):
        assert groups == [pytest.approx(want, rel=1e-12, abs=1e-20)] * len(groups), f"optimizer step {step}"


def test_aligned_timing_runs_step_k_at_the_official_lr_of_step_k_plus_1():
    cfg = _recipe("pascal_swin_t_r64")
    cfg.optim.lr_timing = "aligned"
    cfg.optim.warmup_epochs = 2  # a short run: 2 of 30 epochs warmup, 10 steps each
    official = official_lrs(10, 30, GLOBAL_BATCH, warmup_epochs=2)
    optimizer, scheduler = build_optimizer(torch.nn.Linear(3, 3), cfg.optim, GLOBAL_BATCH, 300, 10)
    ours = [g[0] for g in our_lrs(optimizer, scheduler, 300)]
    assert ours[:-1] == pytest.approx(official[1:], rel=1e-12)
    assert ours[1] > ours[0]


def test_r64_recipe_decays_exactly_what_the_official_optimizer_decays(r64):
    cfg, model = r64
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # official set_weight_decay: no decay for 1-D parameters and names ending in '.bias', nothing else
    official = {n for n, p in model.named_parameters() if p.requires_grad and (p.ndim == 1 or n.endswith(".bias"))}
    assert set(no_decay_names(model, cfg.optim.no_decay)) == official
    optimizer, _ = build_optimizer(model, cfg.optim, GLOBAL_BATCH, 100, 10)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == set(trainable) - official
    assert {g["weight_decay"] for g in optimizer.param_groups} == {OFFICIAL["weight_decay"], 0.0}
    tables = [n for n in trainable if n.endswith("relative_position_bias_table")]
    assert len(tables) == 12 and set(tables) <= decayed  # Swin-T's 12 tables receive decay, as in the paper


def test_default_no_decay_exempts_the_relative_position_tables(r64):
    cfg, model = r64
    exempt = set(no_decay_names(model, load_config(None).optim.no_decay))
    tables = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("relative_position_bias_table")}
    assert tables and tables <= exempt


def test_r64_recipe_keeps_every_other_official_setting(r64):
    cfg, model = r64
    optimizer, _ = build_optimizer(model, cfg.optim, GLOBAL_BATCH, 100, 10)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == OFFICIAL["betas"] and optimizer.defaults["eps"] == OFFICIAL["eps"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (
        deepspeed_config(cfg.deepspeed, BatchGeometry(32, cfg.deepspeed.gradient_accumulation_steps), trainable)[
            "gradient_clipping"
        ]
        == OFFICIAL["clip_grad"]
    )
    assert loss_weights(cfg.data.tasks, cfg.loss_weights) == OFFICIAL["loss_weights"]
    assert cfg.epochs == OFFICIAL["epochs"]


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_every_paper_recipe_uses_the_official_optimizer_settings(name):
    assert _recipe(name).optim == _recipe("pascal_swin_t_r64").optim


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_train_in_bf16_where_the_gpu_has_it(name):
    assert _recipe(name).deepspeed.precision == "auto"


def test_warmup_length_takes_steps_then_epochs_then_a_fraction():
    from mtlora_dist.config import OptimConfig

    assert warmup_length(OptimConfig(warmup_steps=7, warmup_epochs=2), 1000, 100) == 7
    assert warmup_length(OptimConfig(warmup_epochs=2.5), 1000, 100) == 250
    assert warmup_length(OptimConfig(warmup_fraction=0.0667), 46800, 156) == 3122  # the old rule, kept
    assert warmup_length(OptimConfig(warmup_fraction=0.0), 1000, 100) == 0


@pytest.mark.parametrize(
    "override,named",
    [("optim.warmup_fraction=1.5", "optim.warmup_fraction"), ("optim.warmup_epochs=-1", "optim.warmup_epochs")],
)
def test_impossible_warmups_are_refused_naming_the_key(override, named):
    from mtlora_dist.config import ConfigError

    with pytest.raises(ConfigError, match=named):
        load_config(None, [override])
