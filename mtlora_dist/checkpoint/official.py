"""Checkpoints of the official MTLoRA code (scale-lab/MTLoRA) read safely and mapped onto our model.

An official checkpoint is ``torch.save({'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler',
'epoch', 'config'})`` where ``config`` is a pickled yacs ``CfgNode``. It is read with torch's weights-only
unpickler (tensors, storages, plain containers and numbers); the ``CfgNode`` class is the one extra global
allowed, and it is rebuilt as a plain ``dict`` subclass that runs no code of its own. Anything else in the
pickle (a code payload) is refused before it is called.

Key mapping, official -> ours, in order (docs/recipes.md): a ``module.`` prefix dropped;
``<x>.linear.<w>`` -> ``<x>.<w>``; ``backbone.layers.{i}.downsample.*`` -> ``backbone.layers.{i+1}.downsample.*``
(microsoft Swin merges at the end of a stage, timm at the start of the next);
``downsampler.{t}.downsample_{k}.weight`` -> ``decoders.{t}.reducers.{k}.weight``;
``decoders.decoders.{t}.last_layer.{0,1,3}.*`` -> ``decoders.{t}.head.{fuse.0,fuse.1,classifier}.*``.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtlora_dist.checkpoint.format import CheckpointError

__all__ = [
    "OfficialCheckpoint",
    "OfficialCheckpointError",
    "adapter_differences",
    "from_official",
    "official_key",
    "our_key",
    "read_official",
    "to_official",
]

_HEAD = {"0": "fuse.0", "1": "fuse.1", "3": "classifier"}
_HEAD_BACK = {v: k for k, v in _HEAD.items()}
_DERIVED_BUFFERS = (".relative_position_index", ".attn_mask")  # recomputed from the window size
_SCALES = ("lora_shared_scale", "lora_task_scale")


class OfficialCheckpointError(CheckpointError):
    """An official checkpoint that is unsafe to read or does not fit the chosen config."""


class _ConfigNode:
    """Stands in for yacs' ``CfgNode`` while unpickling: creating one gives a plain ``OrderedDict`` (the one
    mapping type torch's weights-only unpickler fills and builds), so no class of ours runs either."""

    def __new__(cls, *args: Any) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


@dataclass
class OfficialCheckpoint:
    """The parts of an official checkpoint we use: the model's tensors, its config as plain data, the epoch."""

    model: dict[str, torch.Tensor]
    config: dict[str, Any]
    epoch: int | None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_official(path: str) -> OfficialCheckpoint:
    """Read ``path`` without running code from it; :class:`OfficialCheckpointError` names what was refused."""
    try:
        with torch.serialization.safe_globals([(_ConfigNode, "yacs.config.CfgNode")]):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise OfficialCheckpointError(f"official checkpoint '{path}' does not exist") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        raise OfficialCheckpointError(
            f"refused to read '{path}': it holds more than tensors, numbers, plain containers and a yacs config "
            f"(nothing from it was run): {_reason(err)}"
        ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise OfficialCheckpointError(
            f"'{path}' is not an official MTLoRA checkpoint: expected a dict with a 'model' state dict, "
            f"found {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}"
        )
    model = {k.removeprefix("module."): v for k, v in raw["model"].items()}
    bad = sorted(k for k, v in model.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise OfficialCheckpointError(f"'{path}': model entries that are not tensors: {bad[:8]}")
    epoch = raw.get("epoch")
    return OfficialCheckpoint(model, _plain(raw.get("config") or {}), epoch if isinstance(epoch, int) else None)


def _reason(err: BaseException) -> str:
    """The line of torch's weights-only error that names what was refused (its advice left out)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "WeightsUnpickler error" in line or "Unsupported" in line]
    text = (named or lines or [type(err).__name__])[0]
    text = text.split("WeightsUnpickler error:")[-1].split(" Please use")[0].strip()
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def official_key(ours: str) -> str:
    """Our parameter name -> the official one (the inverse of :func:`our_key`)."""
    m = re.fullmatch(r"decoders\.([^.]+)\.reducers\.(\d+)\.weight", ours)
    if m:
        return f"downsampler.{m[1]}.downsample_{m[2]}.weight"
    m = re.fullmatch(r"decoders\.([^.]+)\.head\.(fuse\.0|fuse\.1|classifier)\.(.+)", ours)
    if m:
        return f"decoders.decoders.{m[1]}.last_layer.{_HEAD_BACK[m[2]]}.{m[3]}"
    return re.sub(
        r"^backbone\.layers\.(\d+)\.downsample\.", lambda x: f"backbone.layers.{int(x[1]) - 1}.downsample.", ours
    )


def our_key(official: str) -> str:
    """An official parameter name -> ours, by the mapping in the module docstring."""
    name = re.sub(r"\.linear\.(weight|bias)$", r".\1", official)
    m = re.fullmatch(r"downsampler\.([^.]+)\.downsample_(\d+)\.weight", name)
    if m:
        return f"decoders.{m[1]}.reducers.{m[2]}.weight"
    m = re.fullmatch(r"decoders\.decoders\.([^.]+)\.last_layer\.(\d+)\.(.+)", name)
    if m and m[2] in _HEAD:
        return f"decoders.{m[1]}.head.{_HEAD[m[2]]}.{m[3]}"
    return re.sub(
        r"^backbone\.layers\.(\d+)\.downsample\.", lambda x: f"backbone.layers.{int(x[1]) + 1}.downsample.", name
    )


def _adapted_linears(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if hasattr(m, "lora_shared_A") or hasattr(m, "lora_tasks_A")}


def to_official(model: nn.Module, *, dead_fc2: bool = True) -> dict[str, torch.Tensor]:
    """Our model's weights in the official layout (what the official code's ``state_dict()`` holds): the
    adapted linears' weights under ``.linear``, its derived buffers, and the dead shared adapter of the
    last block's fc2 (zeros) that the official model carries. For tests and for going back."""
    linears = _adapted_linears(model)
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if name.rsplit(".", 1)[-1] in _SCALES:
            continue  # the official scales are config values, not tensors
        owner, _, leaf = name.rpartition(".")
        if owner in linears and leaf in ("weight", "bias"):
            name = f"{owner}.linear.{leaf}"
        out[official_key(name)] = value.clone()
    for name, buffer in model.named_buffers():
        if name.endswith(_DERIVED_BUFFERS):
            out[official_key(name)] = buffer.clone()
    if dead_fc2:
        for name in _dead_fc2(model):
            out[official_key(name[0])] = torch.zeros(name[1])
    return out


def _dead_fc2(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """The shared adapter the official model keeps on the last block's fc2, whose output only feeds the
    task streams (no gradient ever reaches it): (name, shape) for its A and B."""
    fc2 = [n for n, m in model.named_modules() if n.endswith(".mlp.fc2") and hasattr(m, "lora_tasks_A")]
    if not fc2:
        return []
    last = max(fc2, key=lambda n: [int(x) for x in re.findall(r"\.(\d+)\.", f".{n}.")])
    if hasattr(model.get_submodule(last), "lora_shared_A"):
        return []
    module = model.get_submodule(last)
    rank = next(iter(module.lora_tasks_A.values())).shape[0]
    return [
        (f"{last}.lora_shared_A", (rank, module.in_features)),
        (f"{last}.lora_shared_B", (module.out_features, rank)),
    ]


def from_official(official: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The official model's tensors renamed onto ``model``'s state dict; every key and shape accounted for.

    Expected leftovers: the official derived buffers (each ``relative_position_index`` must equal ours),
    the dead fc2 shared adapter, and our scale buffers (checked against the config by
    :func:`adapter_differences`). Anything else unmapped on either side is an error listing the keys."""
    ours = model.state_dict()
    buffers = dict(model.named_buffers())
    dead = {official_key(n) for n, _ in _dead_fc2(model)}
    mapped: dict[str, torch.Tensor] = {}
    unmapped, wrong_index = [], []
    for key, value in official.items():
        name = our_key(key)
        if key.endswith(_DERIVED_BUFFERS):
            if key.endswith(".relative_position_index") and not torch.equal(buffers.get(name, torch.empty(0)), value):
                wrong_index.append(key)
            continue
        if key in dead and name not in ours:
            continue
        if name in ours:
            mapped[name] = value
        else:
            unmapped.append(key)
    missing = sorted(n for n in ours if n not in mapped and n.rsplit(".", 1)[-1] not in _SCALES)
    shapes = sorted(
        f"{n}: file {tuple(v.shape)} vs model {tuple(ours[n].shape)}"
        for n, v in mapped.items()
        if v.shape != ours[n].shape
    )
    problems = []
    if unmapped:
        problems.append(f"keys of the file with no place in the model: {_few(sorted(unmapped))}")
    if missing:
        problems.append(f"model keys the file does not hold: {_few(missing)}")
    if shapes:
        problems.append(f"shapes that differ (another adapter rank or backbone?): {_few(shapes)}")
    if wrong_index:
        problems.append(f"relative_position_index differs (another window size?): {_few(wrong_index)}")
    if problems:
        raise OfficialCheckpointError(
            "the official checkpoint does not fit the chosen config: "
            + "; ".join(problems)
            + "; choose the config (model, adapter ranks, tasks) it was trained with"
        )
    return mapped


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _per_stage(value: Any, stages: int = 4) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)] * stages
    values = [float(v) for v in value]
    return values * stages if len(values) == 1 else values


def adapter_differences(official_config: dict, tasks: list[str], adapter: Any) -> list[str]:
    """Where the official run's config (``TASKS``, ``MODEL.MTLORA.{R, R_PER_TASK, SHARED_SCALE,
    TASK_SCALE}``) differs from ours; keys the official config lacks are not compared."""
    mtlora = official_config.get("MODEL", {}).get("MTLORA", {})
    found: list[str] = []
    theirs_tasks = official_config.get("TASKS")
    if theirs_tasks is not None and sorted(theirs_tasks) != sorted(tasks):
        found.append(f"tasks: {sorted(theirs_tasks)} in the file, {sorted(tasks)} here (data.tasks)")
    task_scale = adapter.task_scale if adapter.task_scale is not None else adapter.shared_scale
    pairs = [
        ("MODEL.MTLORA.R", mtlora.get("R"), adapter.shared_rank, "adapter.shared_rank"),
        ("MODEL.MTLORA.SHARED_SCALE", mtlora.get("SHARED_SCALE"), adapter.shared_scale, "adapter.shared_scale"),
        ("MODEL.MTLORA.TASK_SCALE", mtlora.get("TASK_SCALE"), task_scale, "adapter.task_scale"),
    ]
    per_task = mtlora.get("R_PER_TASK") or {}
    for task in tasks:
        ours = adapter.task_rank.get(task) if isinstance(adapter.task_rank, dict) else adapter.task_rank
        pairs.append((f"MODEL.MTLORA.R_PER_TASK.{task}", per_task.get(task), ours, f"adapter.task_rank[{task}]"))
    for key, theirs, ours, ours_key in pairs:
        if isinstance(ours, dict) or theirs is None:
            continue
        if _per_stage(theirs) != _per_stage(ours):
            found.append(f"{key}: {theirs!r} in the file, {ours_key}: {ours!r} here")
    return found
