"""Put MTLoRA layers into a timm Swin by module-name patterns, as PEFT does with ``target_modules``.

Patterns are ``fnmatch`` globs over timm's module names (``layers.2.blocks.5.mlp.fc1``). The block
index may be written ``last`` to mean the last block of its stage, which is where the paper puts
TS-LoRA: ``layers.*.blocks.last.mlp.fc1``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from mtlora_dist.adapters.config import AdapterConfig
from mtlora_dist.adapters.mtlora_linear import MTLoRALinear

__all__ = ["AdapterConfig", "inject_adapters", "mtlora_layers"]

_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
# TS-LoRA needs to know which layers see one stream per task: the MLP does (after a TS proj, or
# stacked by the block), attention projections see the shared attention output.
_TASK_INPUT_SUFFIXES = ("mlp.fc1", "mlp.fc2")
_TASK_CAPABLE_SUFFIXES = ("attn.proj",) + _TASK_INPUT_SUFFIXES


def _stage_value(value: Any, stage: int, what: str) -> Any:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if stage >= len(value):
            raise ValueError(f"{what} lists {len(value)} stages but the backbone has stage {stage}")
        return value[stage]
    return value


def _per_task_stage(value: Any, tasks: Sequence[str], stage: int, what: str) -> Any:
    if isinstance(value, Mapping):
        missing = [t for t in tasks if t not in value]
        if missing:
            raise ValueError(f"{what} has no entry for task(s) {missing}; give one per task or a single value")
        return {t: _stage_value(value[t], stage, f"{what}.{t}") for t in tasks}
    return _stage_value(value, stage, what)


def _aliases(name: str, last_block: Mapping[int, int]) -> list[str]:
    """The name itself, plus the ``blocks.last`` spelling when it is its stage's last block."""
    m = _BLOCK.match(name)
    if m and last_block.get(int(m.group(1))) == int(m.group(2)):
        return [name, f"layers.{m.group(1)}.blocks.last.{name[m.end() :]}"]
    return [name]


def _matches(name: str, patterns: Sequence[str], last_block: Mapping[int, int]) -> bool:
    return any(fnmatch.fnmatchcase(alias, p) for alias in _aliases(name, last_block) for p in patterns)


def _stage_of(name: str) -> int:
    """Stage index in the official numbering: timm runs patch merging at the start of stage i+1,
    the official code at the end of stage i, and ranks are configured per official stage."""
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1))
    m = _DOWNSAMPLE.match(name)
    if m:
        return int(m.group(1)) - 1
    raise ValueError(f"adapter target '{name}' is neither in a block nor a patch merging layer")


def inject_adapters(backbone: nn.Module, cfg: AdapterConfig, tasks: Sequence[str]) -> list[str]:
    """Replace every matching ``nn.Linear`` of ``backbone`` with an :class:`MTLoRALinear`.

    Returns the names of the replaced layers. Raises when a TS pattern selects a layer whose task
    streams would be discarded (they would be parameters that never train).
    """
    linears = {n: m for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    last_block: dict[int, int] = {}
    for n in linears:
        m = _BLOCK.match(n)
        if m:
            last_block[int(m.group(1))] = max(last_block.get(int(m.group(1)), 0), int(m.group(2)))

    replaced = []
    for name, linear in linears.items():
        is_ta = _matches(name, cfg.ta_targets, last_block)
        is_ts = bool(tasks) and _matches(name, cfg.ts_targets, last_block)
        if not (is_ta or is_ts):
            continue
        if is_ts:
            _check_task_layer(name, last_block)
        stage = _stage_of(name)
        shared_scale = _stage_value(cfg.shared_scale, stage, "adapter.shared_scale")
        task_scale = (
            shared_scale
            if cfg.task_scale is None
            else _per_task_stage(cfg.task_scale, tasks, stage, "adapter.task_scale")
        )
        layer = MTLoRALinear.from_linear(
            linear,
            shared_rank=_stage_value(cfg.shared_rank, stage, "adapter.shared_rank") if is_ta else 0,
            tasks=tuple(tasks) if is_ts else (),
            task_rank=_per_task_stage(cfg.task_rank, tasks, stage, "adapter.task_rank") if is_ts else 0,
            shared_scale=shared_scale,
            task_scale=task_scale,
            dropout=cfg.dropout,
            trainable_scale_shared=cfg.trainable_scale_shared,
            trainable_scale_per_task=cfg.trainable_scale_per_task,
            mode=cfg.mode,
            task_input=name.endswith(_TASK_INPUT_SUFFIXES),
        )
        parent_name, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent_name), child, layer)
        replaced.append(name)
    if not replaced and (cfg.ta_targets or cfg.ts_targets):  # empty lists: no adapters (full fine-tuning)
        raise ValueError(f"no layer matched adapter.ta_targets {cfg.ta_targets} or ts_targets {cfg.ts_targets}")
    return replaced


def _check_task_layer(name: str, last_block: Mapping[int, int]) -> None:
    m = _BLOCK.match(name)
    if not m or not name.endswith(_TASK_CAPABLE_SUFFIXES):
        raise ValueError(
            f"TS-LoRA target '{name}': task branches are supported on attn.proj, mlp.fc1 and mlp.fc2 "
            "of a block (qkv feeds the one shared attention); fix adapter.ts_targets"
        )
    if last_block[int(m.group(1))] != int(m.group(2)):
        raise ValueError(
            f"TS-LoRA target '{name}' is not in the last block of its stage: only the last block's task "
            "streams reach the decoders, so these parameters would never train (official bug B2); "
            "use 'blocks.last' in adapter.ts_targets"
        )


def mtlora_layers(module: nn.Module) -> dict[str, MTLoRALinear]:
    """All MTLoRA layers of a module by name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, MTLoRALinear)}
