"""The run configuration: one typed schema, composed from YAML files with Hydra, overridden by
``key=value`` arguments, validated before anything is written.

Every section maps one-to-one onto a constructor: ``model`` -> :class:`ModelConfig`, ``adapter`` ->
:class:`AdapterConfig`, ``trainable`` -> :class:`TrainableConfig`, ``data.storage`` ->
:class:`StorageOptions`, and so on. The schema is registered with Hydra's ConfigStore as
``mtlora_schema``; every primary YAML lists it first in its ``defaults``, so an override of any
schema key works without ``+`` and an unknown key is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtlora_dist.adapters.inject import AdapterConfig
from mtlora_dist.models.multitask import ModelConfig
from mtlora_dist.models.trainable import TrainableConfig
from mtlora_dist.storage.fs import StorageOptions, redact

__all__ = ["TrainConfig", "load_config", "ConfigError", "to_yaml"]

DEFAULT_TASKS = ["semseg", "human_parts", "sal", "normals"]


class ConfigError(ValueError):
    """A configuration problem, with the key and the fix in the message."""


@dataclass
class SyntheticDataConfig:
    """Synthetic PASCAL-Context/NYUD-layout data made on first use when no shards are given."""

    root: str = "data/synthetic"
    num_train: int = 96
    num_val: int = 32
    seed: int = 0
    shard_size_mb: float = 1.0


@dataclass
class DataConfig:
    dataset: str = "pascal_context"
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    train_url: str | None = None  # webdataset shards (folder or s3:// prefix with manifest.json); null -> synthetic
    val_url: str | None = None
    batch_size: int = 8  # per rank, per micro-step
    eval_batch_size: int = 8
    num_workers: int | None = None  # DataLoader workers per loader; null = from the CPUs (docs/data.md)
    on_error: str = "skip"  # skip (counted) | raise
    eval_protocol: str = "original"  # original | official
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    storage: StorageOptions = field(default_factory=StorageOptions)


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine, stepped per optimizer step (spec B §7).

    ``lr_scaling: linear`` scales every lr by global_batch / 512 as the official code does.
    """

    base_lr: float = 5e-4
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_scaling: str = "linear"  # linear | none
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_fraction: float = 20 / 300  # used when warmup_steps is 0


@dataclass
class DeepSpeedSettings:
    """What we hand to ``deepspeed.initialize``; ``extra`` is merged into the DeepSpeed JSON as is."""

    zero_stage: int = 2
    offload_optimizer: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 5.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "mtlora-dist"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    log_every: int = 10
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0 = only at the end and on a termination signal
    keep_last: int = 3
    resume: bool = True  # continue from the newest complete checkpoint in run_dir
    local_cache: str | None = None  # staging folder for remote run_dirs


@dataclass
class EvalConfig:
    every: int = 0  # steps; 0 = only at the end
    max_batches: int = 0  # 0 = the whole split
    visual_samples: int = 4  # validation images in <run_dir>/reports/predictions_step_*.png; 0 = no grid
    baselines: dict[str, float] = field(default_factory=lambda: {
        "semseg": 67.21, "human_parts": 61.93, "sal": 62.35, "normals": 17.97})


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 0  # optimizer steps; 0 -> epochs * steps per epoch
    epochs: int = 300
    steps_per_job: int = 0  # stop (with a checkpoint) after this many steps in one invocation; 0 = no limit
    loss_weights: dict[str, float] = field(default_factory=dict)  # overrides of the task registry
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


ConfigStore.instance().store(name="mtlora_schema", node=TrainConfig)

_CHOICES = {
    "data.on_error": ("skip", "raise"),
    "data.eval_protocol": ("original", "official"),
    "optim.lr_scaling": ("linear", "none"),
    "deepspeed.precision": ("fp32", "bf16", "fp16"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "logging.wandb.mode": ("offline", "online", "disabled"),
    "model.pyramid": ("official", "timm"),
}


def _check_choices(cfg: TrainConfig) -> None:
    for key, valid in _CHOICES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in valid:
            raise ConfigError(f"config key '{key}' is {value!r}; valid choices: {list(valid)}")


def _explain(err: Exception, overrides: list[str]) -> str:
    """Hydra/OmegaConf errors name the key; add the valid keys at that level."""
    msg = str(err).strip().splitlines()[0]
    key = getattr(err, "full_key", None) or ""
    if not key:
        quoted = re.search(r"'([A-Za-z_][\w.]*)'", msg)
        key = quoted.group(1) if quoted else ""
    node = OmegaConf.structured(TrainConfig)
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    try:
        section = OmegaConf.select(node, parent) if parent else node
        valid = sorted(section.keys()) if hasattr(section, "keys") else []
    except Exception:  # the parent itself may be the unknown key
        valid = []
    hint = f"; valid keys{' under ' + parent if parent else ''}: {valid}" if valid else ""
    return f"invalid configuration: {msg}{hint} (overrides: {overrides})"


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Compose ``path`` (a YAML under ``configs/``) with ``overrides`` and validate it against the schema."""
    overrides = list(overrides or [])
    path = os.path.abspath(path or os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.yaml"))
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist; pass --config with a YAML under configs/")
    try:
        with initialize_config_dir(config_dir=os.path.dirname(path), version_base=None):
            composed = compose(config_name=os.path.splitext(os.path.basename(path))[0], overrides=overrides)
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), composed)
        cfg: TrainConfig = OmegaConf.to_object(merged)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err, overrides)) from None
    _check_choices(cfg)
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML with credentials masked (what is saved in the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.structured(cfg)))))
