"""Turn an official MTLoRA checkpoint into a complete checkpoint of a run (docs/recipes.md).

The run's checkpoint is written the way training writes one: the model built from the config, the
official weights loaded into it, a DeepSpeed engine and a :class:`~mtlora_dist.checkpoint.Checkpointer`
saving it. ``launch/eval.py``, ``launch/export.py`` and ``launch/train.py`` then read it like any other.
By default it is step 0 and training continues with a fresh optimizer and schedule; with
``optimizer="official"`` it is the official run's step, with its AdamW moments and schedule position, so
the next step is the one the official code would take. The official file's frozen backbone becomes the
run's ``model.pretrained`` (a timm-layout safetensors file), or is checked equal to the one the config names.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from mtlora_dist import comm
from mtlora_dist.checkpoint import Checkpointer, SavePolicy
from mtlora_dist.checkpoint.format import short_list
from mtlora_dist.checkpoint.official import (
    OfficialCheckpointError,
    OfficialOptimizerState,
    from_official,
    official_optimizer_state,
    read_official,
    recipe_differences,
)
from mtlora_dist.checkpoint.storage import CheckpointStore
from mtlora_dist.checkpoint.trainable import gather_trainable, restore_trainable
from mtlora_dist.config import ConfigError, TrainConfig, to_yaml
from mtlora_dist.engine.data_setup import batch_geometry
from mtlora_dist.engine.deepspeed_setup import initialize_engine, resolve_precision
from mtlora_dist.engine.distributed import init_distributed
from mtlora_dist.engine.fingerprint import run_fingerprint
from mtlora_dist.engine.optim import no_decay_names, warmup_length
from mtlora_dist.engine.rng import seed_everything
from mtlora_dist.models import MultiTaskSwin, build_model
from mtlora_dist.storage.atomic import atomic_write_text
from mtlora_dist.storage.fs import join, url_to_fs

__all__ = ["import_official", "BACKBONE_FILE", "OPTIMIZER_CHOICES"]

BACKBONE_FILE = "pretrained_backbone.safetensors"
OPTIMIZER_CHOICES = ("fresh", "official")
log = logging.getLogger("mtlora_dist")


def _build(cfg: TrainConfig) -> MultiTaskSwin:
    seed_everything(cfg.seed)  # as the trainer builds, so evaluation rebuilds the same frozen weights
    return build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)


def _backbone_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's pretrained part in timm's layout (adapters left out)."""
    return {
        k.removeprefix("backbone."): v.contiguous()
        for k, v in weights.items()
        if k.startswith("backbone.") and "lora_" not in k
    }


def _check_backbone(model: MultiTaskSwin, weights: dict[str, torch.Tensor], pretrained: str) -> None:
    own = model.state_dict()
    differ = sorted(
        k for k, v in _backbone_weights(weights).items() if not torch.equal(own[f"backbone.{k}"].to(v.dtype), v)
    )
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    differ = [k for k in differ if f"backbone.{k}" in frozen]
    if differ:
        raise OfficialCheckpointError(
            f"the frozen backbone in the official checkpoint differs from model.pretrained '{pretrained}' in "
            f"{len(differ)} tensors ({', '.join(differ[:5])}); set model.pretrained=null to use the file's own"
        )


def import_official(
    cfg: TrainConfig, path: str, backbone_out: str | None = None, optimizer: str = "fresh", weights: str = "model"
) -> str:
    """Import the official checkpoint ``path`` into ``cfg.run_dir``; returns the checkpoint's URL.

    ``backbone_out``: where the frozen backbone goes when ``cfg.model.pretrained`` is null (default
    ``<run_dir>/pretrained_backbone.safetensors``; local paths only; never over an existing file).
    ``optimizer``: ``fresh`` (step 0, zero moments) or ``official`` (the file's step, schedule position
    and AdamW moments, refused with the reason where they do not map exactly).
    ``weights``: the file's key to import (``model``, or an EMA copy's key)."""
    if optimizer not in OPTIMIZER_CHOICES:
        raise ConfigError(f"optimizer={optimizer!r}: choose one of {list(OPTIMIZER_CHOICES)}")
    official = read_official(path, weights)
    for key, count in official.other_weights.items():
        log.warning(
            "the file also holds weights under '%s' (%d tensors, e.g. an EMA copy); importing '%s'. "
            "To import '%s' instead, pass weights=%s",
            key,
            count,
            official.weights_key,
            key,
            key,
        )
    model = _build(cfg)
    differences = recipe_differences(official.config, cfg, model)
    if differences:
        raise OfficialCheckpointError(
            f"the official checkpoint was trained with other settings ({len(differences)}): " + "; ".join(differences)
        )
    mapped = from_official(official.model, model)  # names and shapes checked before anything is written
    state = None
    if optimizer == "official":
        state = official_optimizer_state(official, model)
        _check_continuation(state, cfg, model)
    _refuse_used_run_dir(cfg)
    out = None if cfg.model.pretrained else _backbone_path(cfg, backbone_out)
    info = init_distributed()
    if info.world_size != 1:
        raise ConfigError("run launch/import_official.py as one process (python, not a launcher)")
    try:
        return _write(cfg, mapped, out, info.device, state)
    finally:
        comm.shutdown()


def _check_continuation(state: OfficialOptimizerState, cfg: TrainConfig, model: MultiTaskSwin) -> None:
    """The recipe must continue the official run the way the official code would: the same decay split and
    AdamW settings, the lagged lr timing, and the same schedule (at the official steps per epoch)."""

    def refuse(why: str) -> OfficialCheckpointError:
        return OfficialCheckpointError(f"cannot continue with the official optimizer state: {why}")

    optim = cfg.optim
    if state.weight_decays != [float(optim.weight_decay), 0.0]:
        raise refuse(f"its weight decays are {state.weight_decays}, this recipe's [{optim.weight_decay}, 0.0]")
    exempt = set(no_decay_names(model, optim.no_decay))
    if exempt != state.no_decay:
        raise refuse(
            f"this recipe exempts other parameters from weight decay ({short_list(exempt ^ state.no_decay)}); "
            "use optim.no_decay=['*.bias'] (optim=paper), as the official set_weight_decay"
        )
    if tuple(optim.betas) != state.betas or float(optim.eps) != state.eps:
        raise refuse(
            f"its AdamW betas/eps are {state.betas}/{state.eps}, this recipe's {tuple(optim.betas)}/{optim.eps}"
        )
    if optim.lr_timing != "lagged":
        raise refuse("optim.lr_timing=aligned runs each step one schedule index ahead of the official code; use lagged")
    total = cfg.max_steps or cfg.epochs * state.steps_per_epoch
    warmup = warmup_length(optim, total, state.steps_per_epoch)
    if (total, warmup) != (state.total_steps, state.warmup_steps):
        raise refuse(
            f"the official schedule is {state.total_steps} steps ({state.steps_per_epoch} per epoch) with "
            f"{state.warmup_steps} of warmup; this recipe at {state.steps_per_epoch} steps per epoch gives {total} "
            f"with {warmup} (set epochs, max_steps, optim.warmup_*)"
        )


def _backbone_path(cfg: TrainConfig, backbone_out: str | None) -> str:
    """Where the file's backbone goes: never over an existing file (another run's backbone, say)."""
    if "://" in cfg.run_dir and backbone_out is None:
        raise ConfigError("a remote run_dir needs backbone_out=LOCAL_PATH for the backbone's weights")
    out = os.path.abspath(backbone_out or os.path.join(cfg.run_dir, BACKBONE_FILE))
    if os.path.exists(out):
        raise ConfigError(
            f"backbone_out {out} already exists (another run may use it): pass a new path, or remove it first"
        )
    return out


def _refuse_used_run_dir(cfg: TrainConfig) -> None:
    """An import starts a run: never over another run's config, checkpoints or backbone file."""
    fs, path = url_to_fs(join(cfg.run_dir, "config.yaml"), cfg.data.storage)
    found = CheckpointStore(join(cfg.run_dir, "checkpoints"), cfg.data.storage).newest_complete()
    if found is not None or fs.exists(path):
        raise ConfigError(f"{cfg.run_dir} already holds a run (config.yaml or checkpoints); import into a new run_dir")


def _write(
    cfg: TrainConfig, mapped: dict[str, torch.Tensor], out: str | None, device, state: OfficialOptimizerState | None
) -> str:
    # as the trainer does: 'auto' becomes this device's precision, recorded in config.yaml, so the frozen
    # weights' fingerprint in the checkpoint is taken in the precision the run continues in
    cfg.deepspeed.precision = resolve_precision(cfg.deepspeed.precision, device)
    if cfg.model.pretrained:
        _check_backbone(_build(cfg), mapped, cfg.model.pretrained)
    else:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(out), exist_ok=True)
        save_file(_backbone_weights(mapped), out)
        cfg.model.pretrained = out
        log.info("wrote the official backbone to %s (model.pretrained)", out)
    model = _build(cfg)
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # from_official maps onto this model's keys
    total, per_epoch = (state.total_steps, state.steps_per_epoch) if state else (1, 1)
    engine = initialize_engine(
        model.to(device), cfg.optim, cfg.deepspeed, batch_geometry(cfg, world_size=1), total, per_epoch
    )
    checkpointer = Checkpointer(  # first: it prepares the optimizer state that ZeRO-1/2 link lazily
        cfg.run_dir,
        engine,
        policy=SavePolicy(0, cfg.checkpoint.keep_last),
        fingerprint=run_fingerprint(cfg),
        storage=cfg.data.storage,
        local_cache=cfg.checkpoint.local_cache,
    )
    step = _continue_official(engine, state) if state is not None else 0
    atomic_write_text(join(cfg.run_dir, "config.yaml"), to_yaml(cfg), cfg.data.storage)
    url = checkpointer.save(step)
    checkpointer.wait()
    return url


def _continue_official(engine, state: OfficialOptimizerState) -> int:
    """Put the official AdamW moments, Adam's step count and the schedule position into ``engine``, through
    the same calls a resume makes; returns the step the checkpoint is saved as."""
    tensors = gather_trainable(engine)  # the imported weights (param/...) and buffers
    tensors.update(state.tensors)
    restore_trainable(engine, tensors, state.optimizer_step)
    engine.global_steps = state.step
    engine.global_samples = state.step * engine.train_batch_size()
    scheduler = engine.lr_scheduler
    scheduler.last_epoch = state.step - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the schedule alone, no optimizer step: intended
        scheduler.step()  # last_epoch = step; the groups' lrs are the schedule's at that position
    log.info(
        "continuing the official run at step %d (epoch %d, %d steps per epoch; Adam step %d); its lrs %s, "
        "the recipe's here %s at a global batch of %d",
        state.step,
        state.epoch,
        state.steps_per_epoch,
        state.optimizer_step,
        [f"{lr:.4g}" for lr in state.group_lrs],
        [f"{g['lr']:.4g}" for g in engine.optimizer.param_groups],
        engine.train_batch_size(),
    )
    return state.step
