"""Turn an official MTLoRA checkpoint into a complete checkpoint of a run (docs/recipes.md).

The run's checkpoint is written the way training writes one: the model built from the config, the
official weights loaded into it, a DeepSpeed engine and a :class:`~mtlora_dist.checkpoint.Checkpointer`
saving step 0. ``launch/eval.py``, ``launch/export.py`` and ``launch/train.py`` (which continues from it
with a fresh optimizer and schedule) then read it like any other. The official file's frozen backbone
becomes the run's ``model.pretrained`` (a timm-layout safetensors file), or is checked equal to the one
the config names.
"""

from __future__ import annotations

import logging
import os

import torch

from mtlora_dist import comm
from mtlora_dist.checkpoint import Checkpointer, SavePolicy
from mtlora_dist.checkpoint.official import (
    OfficialCheckpointError,
    adapter_differences,
    from_official,
    read_official,
)
from mtlora_dist.checkpoint.storage import CheckpointStore
from mtlora_dist.config import ConfigError, TrainConfig, to_yaml
from mtlora_dist.engine.data_setup import batch_geometry
from mtlora_dist.engine.deepspeed_setup import initialize_engine, resolve_precision
from mtlora_dist.engine.distributed import init_distributed
from mtlora_dist.engine.fingerprint import run_fingerprint
from mtlora_dist.engine.rng import seed_everything
from mtlora_dist.models import MultiTaskSwin, build_model
from mtlora_dist.storage.atomic import atomic_write_text
from mtlora_dist.storage.fs import join, url_to_fs

__all__ = ["import_official", "BACKBONE_FILE"]

BACKBONE_FILE = "pretrained_backbone.safetensors"
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


def import_official(cfg: TrainConfig, path: str, backbone_out: str | None = None) -> str:
    """Import the official checkpoint ``path`` into ``cfg.run_dir``; returns the checkpoint's URL.

    ``backbone_out``: where the frozen backbone goes when ``cfg.model.pretrained`` is null (default
    ``<run_dir>/pretrained_backbone.safetensors``; local paths only)."""
    official = read_official(path)
    differences = adapter_differences(official.config, list(cfg.data.tasks), cfg.adapter)
    if differences:
        raise OfficialCheckpointError(
            "the official checkpoint was trained with another adapter config: " + "; ".join(differences)
        )
    mapped = from_official(official.model, _build(cfg))  # names and shapes checked before anything is written
    _refuse_used_run_dir(cfg)
    info = init_distributed()
    if info.world_size != 1:
        raise ConfigError("run launch/import_official.py as one process (python, not a launcher)")
    try:
        return _write(cfg, mapped, backbone_out, info.device)
    finally:
        comm.shutdown()


def _refuse_used_run_dir(cfg: TrainConfig) -> None:
    """An import starts a run: never over another run's config, checkpoints or backbone file."""
    fs, path = url_to_fs(join(cfg.run_dir, "config.yaml"), cfg.data.storage)
    found = CheckpointStore(join(cfg.run_dir, "checkpoints"), cfg.data.storage).newest_complete()
    if found is not None or fs.exists(path):
        raise ConfigError(f"{cfg.run_dir} already holds a run (config.yaml or checkpoints); import into a new run_dir")


def _write(cfg: TrainConfig, mapped: dict[str, torch.Tensor], backbone_out: str | None, device) -> str:
    # as the trainer does: 'auto' becomes this device's precision, recorded in config.yaml, so the frozen
    # weights' fingerprint in the checkpoint is taken in the precision the run continues in
    cfg.deepspeed.precision = resolve_precision(cfg.deepspeed.precision, device)
    if cfg.model.pretrained:
        _check_backbone(_build(cfg), mapped, cfg.model.pretrained)
    else:
        if "://" in cfg.run_dir and backbone_out is None:
            raise ConfigError("a remote run_dir needs backbone_out=LOCAL_PATH for the backbone's weights")
        from safetensors.torch import save_file

        out = os.path.abspath(backbone_out or os.path.join(cfg.run_dir, BACKBONE_FILE))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        save_file(_backbone_weights(mapped), out)
        cfg.model.pretrained = out
        log.info("wrote the official backbone to %s (model.pretrained)", out)
    model = _build(cfg)
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # from_official maps onto this model's keys
    engine = initialize_engine(
        model.to(device), cfg.optim, cfg.deepspeed, batch_geometry(cfg, world_size=1), total_steps=1
    )
    checkpointer = Checkpointer(
        cfg.run_dir,
        engine,
        policy=SavePolicy(0, cfg.checkpoint.keep_last),
        fingerprint=run_fingerprint(cfg),
        storage=cfg.data.storage,
        local_cache=cfg.checkpoint.local_cache,
    )
    atomic_write_text(join(cfg.run_dir, "config.yaml"), to_yaml(cfg), cfg.data.storage)
    url = checkpointer.save(0)
    checkpointer.wait()
    return url
