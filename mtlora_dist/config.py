"""The run configuration: one typed schema, composed from YAML files with Hydra, overridden by
``key=value`` arguments, validated before anything is written.

Every section maps one-to-one onto a constructor: ``model`` -> :class:`ModelConfig`, ``adapter`` ->
:class:`AdapterConfig`, ``trainable`` -> :class:`TrainableConfig`, ``data.storage`` ->
:class:`StorageOptions`, and so on. The schema is registered with Hydra's ConfigStore as
``mtlora_schema``; every primary YAML lists it first in its ``defaults``, so an override of any
schema key works without ``+`` and an unknown key is refused (``+key=`` too, except inside the open
mappings such as ``deepspeed.extra``).

This module imports neither torch nor DeepSpeed: the entry points check a config in well under a
second before loading them.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtlora_dist.adapters.config import AdapterConfig
from mtlora_dist.choices import StrEnum
from mtlora_dist.data.config import (
    AugmentDevice,
    DataConfig,
    DecodeConfig,
    EvalProtocol,
    OnError,
    OrderConfig,
    ReadConfig,
    SyntheticDataConfig,
    migrate_saved_config,
    renamed_key_error,
)
from mtlora_dist.data.ingest.format_spec import register_format
from mtlora_dist.models.config import MethodConfig, ModelConfig, TrainableConfig, check_method
from mtlora_dist.storage.fs import StorageOptions, has_userinfo, is_secret_key, join, redact, url_to_fs

__all__ = [
    "TrainConfig",
    "AugmentDevice",
    "DataConfig",
    "DecodeConfig",
    "EvalProtocol",
    "OnError",
    "OrderConfig",
    "ReadConfig",
    "StorageOptions",
    "SyntheticDataConfig",
    "load_config",
    "run_config",
    "saved_config_text",
    "run_dir_of",
    "ConfigError",
    "to_yaml",
    "check_data",
    "data_config",
    "group_options",
    "PACKAGE_CONFIGS",
    "SECRET_ENV_HINT",
    "refuse_secret_overrides",
]

PACKAGE_CONFIGS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "configs"))
SECRET_ENV_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment instead (or pass "
    "data.storage.key='${oc.env:MY_KEY_VARIABLE}', which puts only the variable's name on the command line)"
)


class ConfigError(ValueError):
    """A configuration problem, with the key and the fix in the message."""


class LrScaling(StrEnum):
    linear = "linear"  # every lr times global_batch / 512, as the official code does
    none = "none"


class LrTiming(StrEnum):
    aligned = "aligned"  # optimizer step k runs at schedule index k
    lagged = "lagged"  # step k at index max(0, k-1): timm's step_update after the step, as the official code


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # with dynamic loss scaling from 2**16: the official recipe's autocast + GradScaler
    auto = "auto"  # bf16 on a GPU that has it, else fp32; resolved when training starts (config.yaml keeps it)


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine, stepped per optimizer step (spec B §7; docs/recipes.md).

    ``lr_scaling: linear`` scales every lr by global_batch / 512 as the official code does.
    ``lr_timing: lagged`` runs optimizer step k at schedule index k-1 (the official code steps timm's
    scheduler after the optimizer); ``aligned`` at index k. ``no_decay``: name patterns (fnmatch) of
    parameters without weight decay, besides every parameter of at most one dimension; the official
    optimizer exempts ``*.bias`` only, timm also the relative-position tables. Warmup length: the first
    of ``warmup_steps``, ``warmup_epochs`` (x optimizer steps per epoch, exact as the official) and
    ``warmup_fraction`` (x total steps, rounded) that is non-zero.
    """

    base_lr: float = 5e-4
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_scaling: LrScaling = LrScaling.linear
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    warmup_fraction: float = 20 / 300  # used when warmup_steps and warmup_epochs are 0
    lr_timing: LrTiming = LrTiming.aligned
    no_decay: list[str] = field(default_factory=lambda: ["*.bias", "*.relative_position_bias_table", "*.lora_*scale*"])


DIST_BACKENDS = ("auto", "nccl", "gloo", "cuda:gloo")


@dataclass
class DeepSpeedSettings:
    """What we hand to ``deepspeed.initialize``; ``extra`` is merged into the DeepSpeed JSON as is."""

    zero_stage: int = 2
    offload_optimizer: bool = False
    precision: Precision = Precision.fp32
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 5.0
    # elements per ZeRO reduce/all-gather bucket; 0 = sized to the trainable set (docs/gpu.md, "Buckets")
    bucket_size: int = 0
    overlap_comm: bool = True  # reduce finished buckets while the backward goes on (ZeRO 1-3)
    fp32_grad_reduce: bool = True  # under bf16: reduce (and, on ZeRO-2/3, accumulate) gradients in fp32
    # seconds a collective may wait for a peer before every rank stops with a named error (NCCL and gloo)
    process_group_timeout_s: float = 600.0
    # the default process group's backend: auto (NCCL on GPUs, gloo on CPUs), nccl, gloo, or cuda:gloo (gloo
    # for CUDA tensors only: refuses CPU tensors as NCCL does, and runs several ranks on one GPU)
    dist_backend: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bucket_size < 0 or self.bucket_size % 2:
            raise ValueError(
                f"deepspeed.bucket_size is {self.bucket_size}; pass 0 (sized to the trainable set) or a "
                "positive even number of elements (DeepSpeed aligns buckets to 2 elements)"
            )
        if not self.process_group_timeout_s > 0:
            raise ValueError(
                f"deepspeed.process_group_timeout_s is {self.process_group_timeout_s}; pass a positive number "
                "of seconds (default 600)"
            )
        if self.dist_backend not in DIST_BACKENDS:
            raise ValueError(f"deepspeed.dist_backend is '{self.dist_backend}'; pass one of {', '.join(DIST_BACKENDS)}")


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "mtlora-dist"
    entity: str | None = None
    mode: WandbMode = WandbMode.offline
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
    # with resume: false, delete an earlier run's files in run_dir first (without it, a used run_dir is refused)
    overwrite: bool = False
    # a resume whose world size cannot make the saved global batch (micro-batch x accumulation x ranks) is
    # refused; true continues with this run's global batch instead (lrs follow optim.lr_scaling; the rest of
    # the interrupted epoch is read once, in batches of the new size)
    change_global_batch: bool = False
    local_cache: str | None = None  # staging folder for remote run_dirs


@dataclass
class EvalConfig:
    every: int = 0  # steps; 0 = only at the end
    max_batches: int = 0  # 0 = the whole split
    visual_samples: int = 4  # validation images in <run_dir>/reports/predictions_step_*.png; 0 = no grid
    # single-task values of each task's primary metric for Delta-m; null = the dataset's own (the paper's
    # for pascal_context, none for nyud, a declared format's 'baselines')
    baselines: dict[str, float] | None = None


class Balancing(StrEnum):
    fixed = "fixed"  # the task registry's weights with loss_weights overrides (docs/balancing.md)
    uncertainty = "uncertainty"  # learned log-variances (Kendall et al. 2018; torchjd.scalarization.UW)
    dwa = "dwa"  # Dynamic Weight Average (Liu et al. 2019) over windows of optimizer steps
    upgrad = "upgrad"  # torchjd's UPGrad weighting of the per-task gradients' Gramian
    mgda = "mgda"  # torchjd's MGDA weighting of the same Gramian (min-norm; scaled to sum to T)


@dataclass
class UncertaintyConfig:
    init: float = 0.0  # initial log-variance s_t (weights start at w_t * exp(-s_t) / 2)
    lr: float | None = None  # AdamW lr of the log-variances; null = the engine's lr at each step


@dataclass
class DWAConfig:
    temperature: float = 2.0  # T of the softmax over the loss ratios (the paper's 2)
    window: int = 0  # optimizer steps per averaging window; 0 = one epoch


@dataclass
class GramianConfig:
    # the module whose output is the shared representation z; the Gramian is of dL_t/dz (docs/balancing.md)
    module: str = "backbone.patch_embed"


@dataclass
class LossConfig:
    """How the per-task losses become one objective (``loss.balancing``); every method multiplies the
    fixed weights (task registry + ``loss_weights``) by its own (docs/balancing.md)."""

    balancing: Balancing = Balancing.fixed
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    dwa: DWAConfig = field(default_factory=DWAConfig)
    gramian: GramianConfig = field(default_factory=GramianConfig)

    def __post_init__(self) -> None:
        if not self.dwa.temperature > 0:
            raise ValueError(f"loss.dwa.temperature is {self.dwa.temperature}; pass a positive number (the paper's 2)")
        if self.dwa.window < 0:
            raise ValueError(f"loss.dwa.window is {self.dwa.window}; pass 0 (one epoch) or a number of steps")
        if self.uncertainty.lr is not None and not self.uncertainty.lr > 0:
            raise ValueError(f"loss.uncertainty.lr is {self.uncertainty.lr}; pass a positive lr or null (the engine's)")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 0  # optimizer steps; 0 -> epochs * steps per epoch
    epochs: int = 300
    steps_per_job: int = 0  # stop (with a checkpoint) after this many steps in one invocation; 0 = no limit
    loss_weights: dict[str, float] = field(default_factory=dict)  # overrides of the task registry
    loss: LossConfig = field(default_factory=LossConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    method: MethodConfig = field(default_factory=MethodConfig)  # set by the method= group (docs/methods.md)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


ConfigStore.instance().store(name="mtlora_schema", node=TrainConfig)

# Choices that are numbers (an Enum field would show and take member names): checked after composing.
_CHOICES = {
    "deepspeed.zero_stage": (0, 1, 2, 3),
}


def _is_number(value: Any, kind: type) -> bool:
    return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value > 0


def _per_stage(value: Any, kind: type) -> bool:
    return _is_number(value, kind) or (
        isinstance(value, list) and bool(value) and all(_is_number(v, kind) for v in value)
    )


def _check_adapter(adapter: AdapterConfig, tasks: list[str]) -> None:
    """Ranks and scales hold a positive number, a list with one per stage, or (``task_*``) a mapping from
    task name to either; ``task_scale: null`` means the shared scale. OmegaConf has no union fields, so
    the schema types them ``Any`` and this check types them once, when the config is composed."""
    shape = "a positive {}, a list of them (one per stage){}"
    fields = (
        ("shared_rank", int, False),
        ("shared_scale", float, False),
        ("task_rank", int, True),
        ("task_scale", float, True),
    )
    for name, kind, per_task in fields:
        value = getattr(adapter, name)
        if name == "task_scale" and value is None:
            continue
        if per_task and isinstance(value, dict):
            unknown = sorted(set(value) - set(tasks))
            if unknown:
                raise ConfigError(
                    f"config key 'adapter.{name}' names task(s) {unknown} that are not trained; tasks: {list(tasks)}"
                )
            ok = all(_per_stage(v, kind) for v in value.values())
        else:
            ok = _per_stage(value, kind)
        if not ok:
            what = shape.format(
                "integer" if kind is int else "number", ", or a mapping from task name to either" if per_task else ""
            )
            raise ConfigError(f"config key 'adapter.{name}' is {value!r}; expected {what}")


def _check_choices(cfg: TrainConfig) -> None:
    for key, valid in _CHOICES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in valid:
            raise ConfigError(f"config key '{key}' is {value!r}; valid choices: {list(valid)}")


def check_data(data: DataConfig) -> None:
    """A recipe trains on the shards it names; generated data only when asked for (``data=synthetic``, which
    the quickstart uses) and no URLs are given. Checked by the train and eval entry points, not by
    :func:`load_config` (export and parameter counts need no data)."""
    missing = [f"data.{key}" for key in ("train_url", "val_url") if not getattr(data, key)]
    if not missing or (len(missing) == 2 and data.synthetic.enabled):
        return
    raise ConfigError(
        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: this recipe trains on "
        f"{data.dataset} shards. Pass {'them' if len(missing) == 2 else 'both'}, e.g.\n"
        f"  data.train_url=s3://my-bucket/{data.dataset}/train data.val_url=s3://my-bucket/{data.dataset}/val\n"
        "(a folder or s3:// prefix holding manifest.json, written by launch/convert.py; docs/data.md)"
        + ("" if data.synthetic.enabled else ", or add data=synthetic to try the recipe on generated data")
    )


def refuse_secret_overrides(overrides: list[str]) -> None:
    """A credential typed on the command line is printed by the deepspeed launcher (``cmd = ...``), kept
    in shell history and recorded by job schedulers before this code runs: the entry points refuse it
    (without echoing it), whether it is a credential key (``data.storage.secret=...``), a credential
    field inside a mapping value (``data.storage={key: ..., secret: ...}``) or a URL's user-info
    (``s3://KEY:SECRET@bucket/...``). Overrides passed to :func:`load_config` from Python are not checked."""
    for override in overrides:
        key, sep, value = override.partition("=")
        name = key.lstrip("+~")
        if not sep:
            continue
        if has_userinfo(value):
            raise ConfigError(
                f"'{name}' holds a URL with credentials in it (user:password@...), which must not be given on "
                f"the command line (launchers print and record their arguments): {SECRET_ENV_HINT}. If the value "
                "was shared, rotate it"
            )
        field = _credential_field(name, value)
        if field:
            default = " (a default in ${oc.env:VAR,DEFAULT} is typed on the command line too)" * ("oc.env:" in value)
            raise ConfigError(
                f"'{field}' is a credential and must not be given on the command line{default} "
                f"(launchers print and record their arguments): {SECRET_ENV_HINT}. If the value "
                "was shared, rotate it"
            )


def _credential_field(name: str, value: str) -> str | None:
    """The dotted name of a credential that ``name=value`` sets to a literal (not ``${oc.env:VAR}``), if any."""
    if is_secret_key(name.rsplit(".", 1)[-1]) and _is_literal(value):
        return name
    if not value.lstrip().startswith(("{", "[")):
        return None
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides([f"{name}={value}"])[0].value()
    except Exception:  # noqa: BLE001 - unparsable: judged by its text alone below
        parsed = None
    if parsed is None:  # refuse any credential-looking field name inside an unparsable mapping
        found = re.search(r"[{,]\s*['\"]?([\w-]+)['\"]?\s*:\s*([^,}\s][^,}]*)", value)
        return f"{name}.{found.group(1)}" if found and is_secret_key(found.group(1)) else None
    return _secret_in(parsed, name)


def _secret_in(value: Any, prefix: str) -> str | None:
    if isinstance(value, dict):
        for key, sub in value.items():
            path = f"{prefix}.{key}"
            if is_secret_key(str(key)) and isinstance(sub, (str, int, float)) and _is_literal(str(sub)):
                return path
            found = _secret_in(sub, path)
            if found:
                return found
    elif isinstance(value, list):
        return next((f for i, sub in enumerate(value) if (f := _secret_in(sub, f"{prefix}[{i}]"))), None)
    return None


_ENV_REFERENCE = re.compile(r"\$\{oc\.env:\s*[A-Za-z_][A-Za-z0-9_]*\s*(?:,(?P<default>.*))?\}")


def _is_literal(value: str) -> bool:
    """True unless ``value`` is empty or only names an environment variable: ``${oc.env:VAR}``, with a
    default that is itself empty, ``null`` or another such reference. ``${oc.env:UNSET,LITERAL}`` is a
    literal: its default is the secret, typed on the command line."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1].strip()
    if value in ("", "null", "None"):
        return False
    found = _ENV_REFERENCE.fullmatch(value)
    if found is None:
        return True
    default = found.group("default")
    return default is not None and _is_literal(default)


def _refuse_hydra_settings(overrides: list[str]) -> None:
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key == "hydra" or key.startswith("hydra."):
            raise ConfigError(
                f"'{key}' is a Hydra application setting; these entry points compose the config "
                "with Hydra but are not Hydra apps: the output folder is run_dir=..., and a sweep "
                "is launch/sweep.py (docs/study.md)"
            )


def _search_path_override(config_dir: str) -> list[str]:
    """Group folders (model/, adapter/, ...) are looked up beside the config file first, then in the
    package's configs/, so a copied recipe works outside configs/."""
    if os.path.realpath(config_dir) == os.path.realpath(PACKAGE_CONFIGS) or not os.path.isdir(PACKAGE_CONFIGS):
        return []
    return [f"hydra.searchpath=[file://{PACKAGE_CONFIGS}]"]


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Compose ``path`` (a YAML under ``configs/``) with ``overrides`` and validate it against the schema."""
    from mtlora_dist.config_errors import explain  # the error path only

    overrides = list(overrides or [])
    path = os.path.abspath(path or os.path.join(PACKAGE_CONFIGS, "quickstart.yaml"))
    if not os.path.isfile(path):
        raise ConfigError(
            f"config file '{path}' does not exist; pass --config with a YAML under configs/ "
            f"(available: {sorted(group_options([PACKAGE_CONFIGS]).get('', []))})"
        )
    _refuse_hydra_settings(overrides)
    _refuse_renamed_keys(overrides)
    config_dir = os.path.dirname(path)
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            composed = compose(
                config_name=os.path.splitext(os.path.basename(path))[0],
                overrides=overrides + _search_path_override(config_dir),
            )
        # A plain container: keys added with '+' would otherwise ride along into the dataclass unchecked.
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(composed))
        cfg: TrainConfig = OmegaConf.to_object(merged)
    except (HydraException, OmegaConfBaseException) as err:
        dirs = [config_dir, PACKAGE_CONFIGS]
        message = explain(err, overrides, dirs, schema=TrainConfig, group_options=group_options)
        _refuse_renamed_key_in(message, path)
        raise ConfigError(message) from None
    except yaml.YAMLError as err:  # e.g. a !!python/object tag: plain YAML only, nothing is constructed
        raise ConfigError(
            f"{path} (or a config it includes) is not plain YAML: {' '.join(str(err).split())}; remove the tag "
            "or fix the syntax"
        ) from None
    except ValueError as err:  # a dataclass's own check (e.g. AdapterConfig.mode)
        _refuse_renamed_key_in(str(err), path)
        raise ConfigError(f"invalid configuration: {err}") from None
    _check_choices(cfg)
    _check_dataset(cfg.data)
    _check_adapter(cfg.adapter, cfg.data.tasks)
    try:
        check_method(cfg.method, cfg.data.tasks)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_optim(cfg.optim)
    _refuse_urls_with_credentials(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return cfg


def _refuse_renamed_key_in(message: str, path: str) -> None:
    """A config file written before the data sections: name the key's new place."""
    found = re.search(r"unknown config key '(data\.\w+)'", message)
    renamed = renamed_key_error(found.group(1)) if found else None
    if renamed:
        raise ConfigError(f"{path}: {renamed}") from None


def _refuse_renamed_keys(overrides: list[str]) -> None:
    for override in overrides:
        renamed = renamed_key_error(override.partition("=")[0])
        if renamed:
            raise ConfigError(renamed)


def _check_optim(optim: OptimConfig) -> None:
    """Warmup lengths are counts or fractions, never negative; a fraction of the run stays below 1."""
    for key in ("warmup_steps", "warmup_epochs", "warmup_fraction"):
        if getattr(optim, key) < 0:
            raise ConfigError(f"config key 'optim.{key}' is {getattr(optim, key)!r}; expected 0 or more")
    if optim.warmup_fraction >= 1:
        raise ConfigError(
            f"config key 'optim.warmup_fraction' is {optim.warmup_fraction!r}; expected a fraction below 1 "
            "(give a length in optimizer steps with optim.warmup_steps or in epochs with optim.warmup_epochs)"
        )


def _refuse_urls_with_credentials(value: Any, prefix: str = "") -> None:
    """A URL's user-info (``s3://KEY:SECRET@bucket``) is no way to pass S3 credentials (s3fs would take
    ``KEY:SECRET@bucket`` for the bucket name and print it in its error): refused from config files too."""
    if isinstance(value, dict):
        for key, sub in value.items():
            _refuse_urls_with_credentials(sub, f"{prefix}{key}.")
    elif isinstance(value, list):
        for sub in value:
            _refuse_urls_with_credentials(sub, prefix)
    elif isinstance(value, str) and has_userinfo(value):
        raise ConfigError(
            f"'{prefix[:-1]}' is a URL with credentials in it (user:password@...); URLs take none: "
            f"{SECRET_ENV_HINT}. If the value was shared, rotate it"
        )


def _check_dataset(data: DataConfig) -> None:
    """Register a declared dataset (every process that loads the config does), then check the tasks."""
    from mtlora_dist.tasks.registry import DATASETS, check_tasks

    try:
        if data.format is not None:
            register_format(data.dataset, data.format)
        elif data.dataset not in DATASETS:
            raise ValueError(
                f"config key 'data.dataset' is '{data.dataset}', which is neither built in {sorted(DATASETS)} nor "
                "declared: add a 'format:' section to the data config (configs/data/cityscapes.yaml is an "
                "example; docs/data.md)"
            )
        check_tasks(data.dataset, data.tasks)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def data_config(name_or_path: str) -> DataConfig:
    """A data config on its own (``launch/convert.py``): a YAML path, or the name of one in the package's
    ``configs/data/``; validated against the schema, its declared dataset registered."""
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(PACKAGE_CONFIGS, "data", f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        options = group_options([PACKAGE_CONFIGS]).get("data", [])
        raise ConfigError(
            f"no data config '{name_or_path}': give a YAML path or one of configs/data/ {options} (a dataset of "
            "your own is a data config with a 'format:' section, docs/data.md)"
        )
    try:
        loaded = OmegaConf.load(path)
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path} is not a mapping of data config keys")
        data: DataConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), loaded))
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {err} (quote path patterns inside {{...}} mappings: file: '{{id}}.png')") from None
    _check_dataset(data)
    return data


def group_options(config_dirs: list[str]) -> dict[str, list[str]]:
    """``{group: [option, ...]}`` over the config folders (``''``: the primary recipes)."""
    found: dict[str, set[str]] = {}
    for root in config_dirs:
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            full = os.path.join(root, entry)
            if os.path.isdir(full):
                found.setdefault(entry, set()).update(
                    os.path.splitext(f)[0] for f in os.listdir(full) if f.endswith(".yaml")
                )
            elif entry.endswith(".yaml"):
                found.setdefault("", set()).add(os.path.splitext(entry)[0])
    return {group: sorted(options) for group, options in sorted(found.items())}


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML with credentials masked (what is saved in the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.structured(cfg)))))


_MASKED = "***"  # what to_yaml writes in place of credentials


def run_dir_of(checkpoint: str) -> str:
    """The run directory of ``checkpoint=`` (a run directory, its checkpoints/ folder or one step folder)."""
    return re.sub(r"/checkpoints(/step_\d+)?$", "", str(checkpoint).rstrip("/"))


def saved_config_text(run_dir: str, storage: StorageOptions | None = None, *, action: str) -> str | None:
    """The text of ``<run_dir>/config.yaml`` (None if there is none), refused by name unless it is plain
    YAML (a python tag is never constructed). ``action`` says what was about to use it."""
    from mtlora_dist.storage.retry import retry_call

    url = join(run_dir, "config.yaml")
    fs, path = url_to_fs(url, storage)

    def read() -> str | None:
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as fh:
            return fh.read()

    text = retry_call(read, url=url, options=storage)  # an unreachable endpoint: one message naming the URL
    if text is None:
        return None
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as err:
        why = " ".join(str(err).replace('"<unicode string>", ', "").split())
        raise ConfigError(
            f"{url} is not plain YAML ({why}); it was changed after the run wrote it, and {action}: remove the "
            "tag or restore the file (or pass --config with the run's recipe)"
        ) from None
    return text


def run_config(checkpoint: str, config: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The config for evaluating or exporting ``checkpoint``: the YAML ``config`` if given, else the one the
    run saved (``<run_dir>/config.yaml``), with ``overrides`` applied. A saved config has its credentials
    masked; they come from the environment (``AWS_*``) again. Messages name the run's file, never the
    temporary copy that is composed; a missing bucket or refused credentials name the checkpoint's URL."""
    from mtlora_dist.storage.buckets import require_buckets

    if config:
        cfg = load_config(config, overrides)
        require_buckets({"checkpoint": checkpoint}, cfg.data.storage)
        return cfg
    require_buckets({"checkpoint": checkpoint})
    run_dir = run_dir_of(checkpoint)
    text = saved_config_text(run_dir, action="the checkpoint is read with it")
    if text is None:
        raise FileNotFoundError(f"{run_dir} has no config.yaml; pass --config with the run's config")
    with tempfile.TemporaryDirectory(prefix="mtlora-config-") as tmp:
        local = os.path.join(tmp, "run_config.yaml")
        with open(local, "w") as fh:
            fh.write(text)
        try:
            migrate_saved_config(local)  # a run saved before the data sections: its keys moved, said in one line
            cfg = load_config(local, overrides)
        except ConfigError as err:
            raise ConfigError(str(err).replace(local, join(run_dir, "config.yaml"))) from None
    for key in ("key", "secret"):
        if getattr(cfg.data.storage, key) == _MASKED:
            setattr(cfg.data.storage, key, None)
    return cfg
