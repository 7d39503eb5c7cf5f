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

The official run's settings (its yacs config) are compared with ours by :func:`recipe_differences`, and
its AdamW state is mapped onto our parameter names by :func:`official_optimizer_state`.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mtlora_dist.checkpoint.format import CheckpointError, short_list

__all__ = [
    "OfficialCheckpoint",
    "OfficialCheckpointError",
    "OfficialOptimizerState",
    "from_official",
    "official_key",
    "official_optimizer_state",
    "our_key",
    "read_official",
    "recipe_differences",
    "to_official",
]

_HEAD = {"0": "fuse.0", "1": "fuse.1", "3": "classifier"}
_HEAD_BACK = {v: k for k, v in _HEAD.items()}
_DERIVED_BUFFERS = (".relative_position_index", ".attn_mask")  # recomputed from the window size
_SCALES = ("lora_shared_scale", "lora_task_scale")
# what the official save_checkpoint writes besides the weights (and what forks of it add)
_KNOWN_KEYS = {"model", "optimizer", "lr_scheduler", "max_accuracy", "scaler", "epoch", "config"}
_KNOWN_KEYS |= {"min_loss", "amp", "accuracy", "metrics"}


class OfficialCheckpointError(CheckpointError):
    """An official checkpoint that is unsafe to read or does not fit the chosen config."""


class _ConfigNode:
    """Stands in for yacs' ``CfgNode`` while unpickling: creating one gives a plain ``OrderedDict`` (the one
    mapping type torch's weights-only unpickler fills and builds), so no class of ours runs either."""

    def __new__(cls, *args: Any) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


@dataclass
class OfficialCheckpoint:
    """The parts of an official checkpoint we use. ``model`` keeps the file's key order (the official
    model's registration order, which its optimizer state is indexed by); ``other_weights`` names further
    weight copies in the file (an EMA) with their tensor counts."""

    model: dict[str, torch.Tensor]
    config: dict[str, Any]
    epoch: int | None
    optimizer: dict[str, Any] | None = None
    lr_scheduler: dict[str, Any] | None = None
    other_weights: dict[str, int] = field(default_factory=dict)
    weights_key: str = "model"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _state_dict_like(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _check_file(path: str) -> None:
    """Refuse, by its bytes, a file torch would misreport: missing, empty, text, a truncated zip."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(16)
    except FileNotFoundError:
        raise OfficialCheckpointError(f"official checkpoint '{path}' does not exist") from None
    except IsADirectoryError:
        raise OfficialCheckpointError(f"'{path}' is a directory; pass the official ckpt_epoch_N.pth file") from None
    if size == 0:
        raise OfficialCheckpointError(
            f"'{path}' is empty (0 bytes): the save or the copy did not finish; copy it again"
        )
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise OfficialCheckpointError(
                f"'{path}' is truncated or damaged ({size:,} bytes, a zip archive without its end); copy it again"
            )
        return
    if head[:1] != b"\x80":  # a pickle starts with its protocol opcode; torch.save never writes text
        text = head.decode("ascii", "replace")
        kind = "text" if all(c.isprintable() or c in "\r\n\t" for c in text) else "binary data"
        raise OfficialCheckpointError(
            f"'{path}' is not a torch.save file ({kind}, starting {head[:12]!r}); pass the official ckpt_epoch_N.pth"
        )


def read_official(path: str, weights: str = "model") -> OfficialCheckpoint:
    """Read ``path`` without running code from it; :class:`OfficialCheckpointError` names what was refused.

    ``weights``: the top-level key whose state dict is imported (``model``; an EMA copy's key to take that)."""
    _check_file(path)
    try:
        with torch.serialization.safe_globals([(_ConfigNode, "yacs.config.CfgNode")]):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise OfficialCheckpointError(_refusal(path, err)) from None
    except (EOFError, RuntimeError, OSError, KeyError, ValueError, AttributeError, IndexError) as err:
        if "GLOBAL" in str(err):
            raise OfficialCheckpointError(_refusal(path, err)) from None
        raise OfficialCheckpointError(
            f"'{path}' is truncated or damaged ({type(err).__name__}: {_first_line(err)}); copy it again"
        ) from None
    if _state_dict_like(raw):
        first = next(iter(raw))
        raise OfficialCheckpointError(
            f"'{path}' is a bare state dict ({len(raw)} tensors, e.g. '{first}'), not an official checkpoint "
            "(a dict with 'model' and 'config'): pass the ckpt_epoch_N.pth the official main.py saved"
        )
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        found = short_list(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
        raise OfficialCheckpointError(
            f"'{path}' is not an official MTLoRA checkpoint: expected a dict with 'model' and 'config', found {found}"
        )
    others = {str(k): len(v) for k, v in raw.items() if k not in _KNOWN_KEYS and _state_dict_like(v)}
    if weights not in raw or not isinstance(raw[weights], dict):
        raise OfficialCheckpointError(
            f"'{path}' has no weights under '{weights}'; it has 'model'"
            + (f" and {short_list(others)}" if others else "")
        )
    model = {k.removeprefix("module."): v for k, v in raw[weights].items()}
    bad = sorted(k for k, v in model.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise OfficialCheckpointError(f"'{path}': '{weights}' entries that are not tensors: {short_list(bad)}")
    if weights != "model":
        others = {**{k: v for k, v in others.items() if k != weights}, "model": len(raw["model"])}
    epoch = raw.get("epoch")
    return OfficialCheckpoint(
        model,
        _plain(raw.get("config") or {}),
        epoch if isinstance(epoch, int) else None,
        raw.get("optimizer") if isinstance(raw.get("optimizer"), dict) else None,
        raw.get("lr_scheduler") if isinstance(raw.get("lr_scheduler"), dict) else None,
        others,
        weights,
    )


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[0] if lines else "no details")[:160]


def _refusal(path: str, err: BaseException) -> str:
    """The refusal of a pickle that holds more than data, naming the global torch blocked (torch's advice to
    load it unrestricted is left out: that would run the payload)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        what = f"it calls {found[1]}, which is not a tensor, number, container or yacs config"
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
        what = lines[0] if lines else type(err).__name__
    return f"refused to read '{path}' (nothing from it was run): {what}; use a checkpoint from a source you trust"


# -- names --------------------------------------------------------------------------------------------------
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


# Child modules in the official registration order, where it differs from ours: MTLoRALinear registers
# ``linear`` and the task dicts after its own shared parameters, PatchMerging ``reduction`` before ``norm``,
# MultiTaskSwin ``downsampler`` before ``decoders``. Keyed by (parent's last name or "", child).
_LORA_CHILDREN = {"linear": 0, "lora_tasks_A": 1, "lora_tasks_B": 2, "lora_task_scale": 3, "lora_norm": 4}
_CHILD_RANK = {("", "backbone"): 0, ("", "downsampler"): 1, ("downsample", "reduction"): 0, ("downsample", "norm"): 1}


def _official_order(state: dict[str, torch.Tensor], tasks: list[str]) -> dict[str, torch.Tensor]:
    """``state`` (official names) in the order the official model's ``state_dict()`` lists it: a module's
    own tensors before its children, children in registration order, task dicts in ``TASKS`` order."""
    first = {k: i for i, k in enumerate(state)}
    tree: dict = {}
    for key in state:
        node = tree
        for part in key.split("."):
            node = node.setdefault(part, {})

    def keys(prefix: str, node: dict) -> list[str]:
        return [prefix] if not node else [k for c, sub in node.items() for k in keys(f"{prefix}.{c}", sub)]

    def walk(prefix: str, node: dict) -> list[str]:
        parent, lora = prefix.rpartition(".")[2], any(c.startswith("lora_") for c in node)  # an MTLoRALinear

        def rank(child: str) -> tuple:
            name, sub = f"{prefix}.{child}" if prefix else child, node[child]
            order = _LORA_CHILDREN[child] if lora and child in _LORA_CHILDREN else _CHILD_RANK.get((parent, child), 9)
            task = tasks.index(child) if child in tasks else -1
            return (bool(sub), task, order, min(first[k] for k in keys(name, sub)))

        out: list[str] = []
        for child in sorted(node, key=rank):
            name = f"{prefix}.{child}" if prefix else child
            out.extend(walk(name, node[child]) if node[child] else [name])
        return out

    return {k: state[k] for k in walk("", tree)}


def to_official(model: nn.Module, *, dead_fc2: bool = True) -> dict[str, torch.Tensor]:
    """Our model's weights in the official layout and key order (what the official code's ``state_dict()``
    holds): the adapted linears' weights under ``.linear``, its derived buffers, trainable scales as the
    official parameters, and the dead shared adapter of the last block's fc2 that the official model
    carries. For tests and for going back."""
    linears = _adapted_linears(model)
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if name.rsplit(".", 1)[-1] in _SCALES and name not in params:
            continue  # fixed scales are config values in the official model, not tensors
        owner, _, leaf = name.rpartition(".")
        if owner in linears and leaf in ("weight", "bias"):
            name = f"{owner}.linear.{leaf}"
        out[official_key(name)] = value.clone()
    for name, buffer in model.named_buffers():
        if name.endswith(_DERIVED_BUFFERS):
            out[official_key(name)] = buffer.clone()
    if dead_fc2:
        for name, shape, fill in _dead_fc2(model):
            out[official_key(name)] = torch.full(shape, fill)
    return _official_order(out, list(getattr(model, "tasks", ())))


def _dead_fc2(model: nn.Module) -> list[tuple[str, tuple[int, ...], float]]:
    """The shared adapter the official model keeps on the last block's fc2, whose output only feeds the
    task streams (no gradient ever reaches it): (name, shape, initial value) of its A, B and, with
    ``trainable_scale_shared``, its scale parameter."""
    fc2 = [n for n, m in model.named_modules() if n.endswith(".mlp.fc2") and hasattr(m, "lora_tasks_A")]
    if not fc2:
        return []
    last = max(fc2, key=lambda n: [int(x) for x in re.findall(r"\.(\d+)\.", f".{n}.")])
    module = model.get_submodule(last)
    if hasattr(module, "lora_shared_A"):
        return []
    rank = next(iter(module.lora_tasks_A.values())).shape[0]
    dead = [
        (f"{last}.lora_shared_A", (rank, module.in_features), 0.0),
        (f"{last}.lora_shared_B", (module.out_features, rank), 0.0),
    ]
    shared_scales = [
        m.lora_shared_scale for m in model.modules() if isinstance(getattr(m, "lora_shared_scale", None), nn.Parameter)
    ]
    if shared_scales:  # TRAINABLE_SCALE_SHARED: the official fc2 holds its scale as a parameter too
        dead.append((f"{last}.lora_shared_scale", (1,), float(shared_scales[-1].detach().reshape(-1)[0])))
    return dead


def from_official(official: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The official model's tensors renamed onto ``model``'s state dict; every key and shape accounted for.

    Expected leftovers: the official derived buffers (each ``relative_position_index`` must equal ours),
    the dead fc2 shared adapter, and our fixed scale buffers (checked against the config by
    :func:`recipe_differences`). Anything else unmapped on either side is an error listing the keys."""
    ours = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    buffers = dict(model.named_buffers())
    dead = {official_key(n) for n, _, _ in _dead_fc2(model)}
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
    fixed_scale = [n for n in ours if n.rsplit(".", 1)[-1] in _SCALES and n not in params]
    missing = sorted(n for n in ours if n not in mapped and n not in fixed_scale)
    shapes = sorted(
        f"{n}: file {tuple(v.shape)} vs model {tuple(ours[n].shape)}"
        for n, v in mapped.items()
        if v.shape != ours[n].shape
    )
    problems = []
    if unmapped:
        problems.append(f"keys of the file with no place in the model: {short_list(unmapped)}")
    if missing:
        problems.append(f"model keys the file does not hold: {short_list(missing)}")
    if shapes:
        problems.append(f"shapes that differ (another adapter rank or backbone?): {short_list(shapes)}")
    if wrong_index:
        problems.append(f"relative_position_index differs (another window size?): {short_list(wrong_index)}")
    if problems:
        raise OfficialCheckpointError(
            "the official checkpoint does not fit the chosen config: "
            + "; ".join(problems)
            + "; choose the config (model, adapter ranks, tasks) it was trained with"
        )
    return mapped


# -- the official run's settings ----------------------------------------------------------------------------
def _per_stage(value: Any, stages: int = 4) -> list[float] | None:
    """A number or a per-stage list as the official ``update_config`` normalises it (one entry -> every stage)."""
    if value is None or isinstance(value, dict):
        return None
    if isinstance(value, (int, float)):
        return [float(value)] * stages
    values = [float(v) for v in value]
    return values * stages if len(values) == 1 else values


def _ours_per_task(value: Any, task: str) -> Any:
    return value.get(task) if isinstance(value, dict) else value


def _swin_shape(model: nn.Module) -> dict[str, Any]:
    """The backbone's architecture as the official ``MODEL.SWIN`` keys name it, read off the built model."""
    backbone = model.backbone
    block = backbone.layers[0].blocks[0]
    window = block.window_size
    patch = backbone.patch_embed.patch_size
    return {
        "PATCH_SIZE": patch[0] if isinstance(patch, (tuple, list)) else patch,
        "EMBED_DIM": backbone.patch_embed.proj.out_channels,
        "DEPTHS": [len(layer.blocks) for layer in backbone.layers],
        "NUM_HEADS": [layer.blocks[0].attn.num_heads for layer in backbone.layers],
        "WINDOW_SIZE": window[0] if isinstance(window, (tuple, list)) else window,
        "MLP_RATIO": block.mlp.fc1.out_features / block.mlp.fc1.in_features,
    }


def _official_targets(mtlora: dict, model: nn.Module) -> tuple[set[str], set[str]]:
    """The linears that carry the shared (TA) and the task (TS) adapters under the file's ``*_ENABLED`` and
    ``INTERMEDIATE_SPECIALIZATION`` flags, in our module names (the dead fc2 shared adapter left out)."""
    flags = {leaf: bool(mtlora.get(f"{key}_ENABLED", True)) for key, leaf in
             (("QKV", "attn.qkv"), ("PROJ", "attn.proj"), ("FC1", "mlp.fc1"), ("FC2", "mlp.fc2"))}  # fmt: skip
    every_block = bool(mtlora.get("INTERMEDIATE_SPECIALIZATION", False))
    shared, tasks = set(), set()
    for i, layer in enumerate(model.backbone.layers):
        depth = len(layer.blocks)
        for j in range(depth):
            for leaf, on in flags.items():
                name = f"backbone.layers.{i}.blocks.{j}.{leaf}"
                if on:
                    shared.add(name)
                    if leaf != "attn.qkv" and (every_block or j == depth - 1):
                        tasks.add(name)
        if i > 0 and mtlora.get("DOWNSAMPLER_ENABLED", False):  # official layers.{i-1}: our layers.{i}
            shared.add(f"backbone.layers.{i}.downsample.reduction")
    shared -= {name.rsplit(".", 1)[0] for name, _, _ in _dead_fc2(model)}
    return shared, tasks


def recipe_differences(official_config: dict, cfg: Any, model: nn.Module) -> list[str]:
    """Where the official run's recorded settings differ from ``cfg`` (a TrainConfig) and ``model`` (built
    from it): tasks, every ``MODEL.MTLORA`` setting (mode, ranks per stage and task, scales, trainable-scale
    switches, targets, MTLoRA+ reductions, dropout, bias), the image size, the Swin architecture and the
    decoder channels. One ``key: theirs in the file, ours here`` line each; keys the file lacks are skipped.

    The task scale is the official model's: ``SCALE_PER_TASK[t]``, defaulting to ``SHARED_SCALE`` (its
    ``TASK_SCALE`` key is never read by the official model)."""
    adapter, tasks = cfg.adapter, list(cfg.data.tasks)
    found: list[str] = []

    def compare(key: str, theirs: Any, ours: Any, ours_key: str, norm=_per_stage) -> None:
        if theirs is None:
            return
        if (norm(theirs) if norm else theirs) != (norm(ours) if norm else ours):
            found.append(f"{key}: {theirs!r} in the file, {ours_key}={ours!r} here")

    theirs_tasks = official_config.get("TASKS")
    if theirs_tasks is not None and sorted(theirs_tasks) != sorted(tasks):
        found.append(f"TASKS: {list(theirs_tasks)} in the file, data.tasks={tasks} here")
    model_cfg = official_config.get("MODEL", {})
    mtlora = model_cfg.get("MTLORA", {})
    if mtlora.get("ENABLED") is False:
        found.append("MODEL.MTLORA.ENABLED: False in the file (a model without MTLoRA); this framework builds MTLoRA")
    mode = {"add": "addition"}.get(mtlora.get("SHARED_MODE"), mtlora.get("SHARED_MODE"))
    compare("MODEL.MTLORA.SHARED_MODE", mode, str(getattr(adapter.mode, "value", adapter.mode)), "adapter.mode", None)
    per_task_r = mtlora.get("R_PER_TASK") or {}
    shared_r = per_task_r.get("shared", mtlora.get("R"))
    compare("MODEL.MTLORA.R" + ("_PER_TASK.shared" if "shared" in per_task_r else ""), shared_r,
            adapter.shared_rank, "adapter.shared_rank")  # fmt: skip
    shared_scale = mtlora.get("SHARED_SCALE")
    compare("MODEL.MTLORA.SHARED_SCALE", shared_scale, adapter.shared_scale, "adapter.shared_scale")
    per_task_scale = mtlora.get("SCALE_PER_TASK") or {}
    our_task_scale = adapter.task_scale if adapter.task_scale is not None else adapter.shared_scale
    for task in tasks:
        theirs_r = per_task_r.get(task, mtlora.get("R") if not per_task_r else None)
        compare(f"MODEL.MTLORA.R_PER_TASK.{task}", theirs_r, _ours_per_task(adapter.task_rank, task),
                f"adapter.task_rank[{task}]")  # fmt: skip
        key = f"MODEL.MTLORA.SCALE_PER_TASK.{task}" if task in per_task_scale else "MODEL.MTLORA.SHARED_SCALE"
        compare(f"{key} (task scale of {task})", per_task_scale.get(task, shared_scale),
                _ours_per_task(our_task_scale, task), "adapter.task_scale")  # fmt: skip
    compare("MODEL.MTLORA.DROPOUT", mtlora.get("DROPOUT"), adapter.dropout, "adapter.dropout")
    for key, ours in (("TRAINABLE_SCALE_SHARED", adapter.trainable_scale_shared),
                      ("TRAINABLE_SCALE_PER_TASK", adapter.trainable_scale_per_task)):  # fmt: skip
        theirs = mtlora.get(key)
        compare(f"MODEL.MTLORA.{key}", None if theirs is None else bool(theirs), bool(ours),
                f"adapter.{key.lower()}", None)  # fmt: skip
    for key, supported in (("BIAS", "none"), ("SPLIT_QKV", False), ("FREEZE_PRETRAINED", True)):
        if key in mtlora and mtlora[key] != supported:
            found.append(
                f"MODEL.MTLORA.{key}: {mtlora[key]!r} in the file; this framework trains only with {supported!r}"
            )
    if any(k.endswith("_ENABLED") and k != "ENABLED" for k in mtlora) or "INTERMEDIATE_SPECIALIZATION" in mtlora:
        shared, task_linears = _official_targets(mtlora, model)
        ours_shared = {n for n, m in model.named_modules() if hasattr(m, "lora_shared_A")}
        ours_tasks = {n for n, m in model.named_modules() if hasattr(m, "lora_tasks_A")}
        if mode == "addition":
            shared = ours_shared  # addition mode has no shared matrices to place
        for what, theirs, ours, key in (("shared (TA)", shared, ours_shared, "adapter.ta_targets"),
                                        ("task (TS)", task_linears, ours_tasks, "adapter.ts_targets")):  # fmt: skip
            if theirs != ours:
                flags = ("QKV_ENABLED", "PROJ_ENABLED", "FC1_ENABLED", "FC2_ENABLED", "DOWNSAMPLER_ENABLED",
                         "INTERMEDIATE_SPECIALIZATION")  # fmt: skip
                recorded = ", ".join(f"{f}={mtlora[f]}" for f in flags if f in mtlora)
                differ = sorted(theirs ^ ours)
                found.append(
                    f"{what} adapter targets: the file's MODEL.MTLORA ({recorded}) places them differently "
                    f"from {key} in {len(differ)} linears, e.g. {short_list(differ)}"
                )
    img = official_config.get("DATA", {}).get("IMG_SIZE")
    if img is not None:
        theirs_img = [int(img)] * 2 if isinstance(img, (int, float)) else [int(v) for v in img]
        if theirs_img != [int(v) for v in cfg.model.img_size]:
            found.append(f"DATA.IMG_SIZE: {img!r} in the file, model.img_size={list(cfg.model.img_size)} here")
    if model_cfg.get("TYPE", "swin") != "swin":
        found.append(f"MODEL.TYPE: {model_cfg['TYPE']!r} in the file; this framework builds Swin ('swin')")
    swin = model_cfg.get("SWIN", {})
    for key, ours in _swin_shape(model).items():
        theirs = swin.get(key)
        if theirs is not None and (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != ours:
            found.append(
                f"MODEL.SWIN.{key}: {theirs!r} in the file, {ours!r} in model.backbone={cfg.model.backbone} here"
            )
    channels = model_cfg.get("DECODER_CHANNELS")
    if channels is not None and list(channels) != list(cfg.model.decoder_channels):
        found.append(
            f"MODEL.DECODER_CHANNELS: {channels!r} in the file, model.decoder_channels={cfg.model.decoder_channels!r} here"
        )
    return found


# -- the official optimizer state ---------------------------------------------------------------------------
@dataclass
class OfficialOptimizerState:
    """The official AdamW state on our parameter names, and where the run stands.

    ``tensors``: ``exp_avg/<name>`` and ``exp_avg_sq/<name>`` (fp32) for every trainable parameter of ours;
    ``optimizer_step``: Adam's step count (bias correction); ``step``: optimizer steps taken, the schedule
    position, ``(epoch + 1) x steps_per_epoch``; ``total_steps``/``warmup_steps``: the official schedule;
    the groups' lrs, weight decays, betas, eps and the no-decay parameters (our names) as the file has them."""

    tensors: dict[str, torch.Tensor]
    optimizer_step: int
    step: int
    epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    group_lrs: list[float]
    weight_decays: list[float]
    betas: tuple[float, ...]
    eps: float
    no_decay: set[str]


def _official_trainable(name: str, config: dict) -> bool:
    """The official freezing rule (``mark_only_lora_as_trainable`` on the backbone; decoders all trainable)."""
    if not name.startswith("backbone."):
        return True
    train = config.get("TRAIN", {})
    mtlora = config.get("MODEL", {}).get("MTLORA", {})
    freeze_reduction = bool(train.get("FREEZE_DOWNSAMPLE_REDUCTION")) or bool(mtlora.get("DOWNSAMPLER_ENABLED"))
    return (
        "lora_" in name
        or (not train.get("FREEZE_PATCH_EMBED") and "patch_embed" in name)
        or (not train.get("FREEZE_LAYER_NORM") and "norm" in name)
        or (not freeze_reduction and "downsample.reduction" in name)
        or (not train.get("FREEZE_RELATIVE_POSITION_BIAS") and "relative_position_bias_table" in name)
    )


def _refuse(why: str) -> OfficialCheckpointError:
    return OfficialCheckpointError(f"cannot continue with the official optimizer state: {why}")


def official_optimizer_state(official: OfficialCheckpoint, model: nn.Module) -> OfficialOptimizerState:
    """Map the file's AdamW state (torch ``optimizer.state_dict()``: integer indices over the official
    ``set_weight_decay`` groups, decay then no-decay, each in the official model's parameter order) onto
    ``model``'s trainable parameters; refuse, with the reason, anything that does not map exactly. Whether
    the recipe continues the same way (decay split, AdamW settings, schedule) is the caller's check."""
    optimizer, scheduler = official.optimizer, official.lr_scheduler
    if not optimizer or "param_groups" not in optimizer or "state" not in optimizer:
        raise _refuse("the file holds no optimizer state_dict ('optimizer' with 'state' and 'param_groups')")
    if official.epoch is None or not scheduler:
        raise _refuse("the file holds no 'epoch' or no 'lr_scheduler' state")
    ours = dict(model.named_parameters())
    dead = {official_key(n) for n, _, _ in _dead_fc2(model)}
    # the official parameters, in its named_parameters() order: the file's key order without its buffers
    order = [k for k in official.model if our_key(k) in ours or k in dead]
    trainable = [k for k in order if _official_trainable(k, official.config)]
    theirs_set = {our_key(k) for k in trainable if k not in dead}
    ours_set = {n for n, p in ours.items() if p.requires_grad}
    if theirs_set != ours_set:
        differ = sorted(theirs_set ^ ours_set)
        raise _refuse(
            f"the official run trained other parameters than this config ({len(differ)} differ, e.g. "
            f"{short_list(differ)}); match trainable.* to the file's TRAIN.FREEZE_* settings"
        )
    decay = [k for k in trainable if not (official.model[k].dim() == 1 or k.endswith(".bias"))]
    no_decay = [k for k in trainable if k not in set(decay)]
    groups = optimizer["param_groups"]
    expected = [list(range(len(decay))), list(range(len(decay), len(trainable)))]
    if len(groups) != 2 or [list(g.get("params", [])) for g in groups] != expected:
        sizes = [len(g.get("params", [])) for g in groups]
        raise _refuse(
            f"its parameter groups hold {sizes} parameters; the official set_weight_decay on this file's model "
            f"gives [{len(decay)}, {len(no_decay)}] (a file of another model, or of another optimizer setup)"
        )
    if any(g.get("amsgrad") for g in groups):
        raise _refuse("it used AMSGrad; this framework's AdamW does not")

    index = {k: i for i, k in enumerate(decay + no_decay)}
    tensors: dict[str, torch.Tensor] = {}
    steps: set[int] = set()
    lacking = []
    state = optimizer["state"]
    for key in trainable:
        if key in dead:
            continue  # no gradient ever reaches it; our model does not carry it
        name, entry = our_key(key), state.get(index[key])
        if not entry:
            lacking.append(name)
            entry = {}
        for moment in ("exp_avg", "exp_avg_sq"):
            value = entry.get(moment, torch.zeros_like(ours[name], dtype=torch.float32))
            if tuple(value.shape) != tuple(ours[name].shape):
                raise _refuse(
                    f"{moment} of parameter {index[key]} ({key}) has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(ours[name].shape)}: its order is not the official model's"
                )
            tensors[f"{moment}/{name}"] = value.detach().float().clone()
        if "step" in entry:
            steps.add(int(float(entry["step"])))
    if lacking and len(lacking) < len(ours_set):
        raise _refuse(f"no AdamW state for {len(lacking)} trainable parameters, e.g. {short_list(lacking)}")
    if len(steps) > 1:
        raise _refuse(f"Adam's step counts differ across parameters ({sorted(steps)[:4]})")

    epochs = int(official.config.get("TRAIN", {}).get("EPOCHS", 0))
    t_initial, warmup_t = int(scheduler.get("t_initial", 0)), int(scheduler.get("warmup_t", 0))
    total = t_initial + (warmup_t if scheduler.get("warmup_prefix", True) else 0)
    if not epochs or total % epochs:
        raise _refuse(
            f"its schedule ({total} steps) is not a whole number of steps per epoch over TRAIN.EPOCHS={epochs}"
        )
    per_epoch = total // epochs
    step = (official.epoch + 1) * per_epoch
    adam_step = steps.pop() if steps else 0
    if adam_step > step:
        raise _refuse(f"Adam counted {adam_step} steps, more than the {step} of {official.epoch + 1} epochs")
    return OfficialOptimizerState(
        tensors=tensors,
        optimizer_step=adam_step,
        step=step,
        epoch=official.epoch + 1,
        steps_per_epoch=per_epoch,
        total_steps=total,
        warmup_steps=warmup_t,
        group_lrs=[float(g["lr"]) for g in groups],
        weight_decays=[float(g.get("weight_decay", 0.0)) for g in groups],
        betas=tuple(float(b) for b in groups[0].get("betas", (0.9, 0.999))),
        eps=float(groups[0].get("eps", 1e-8)),
        no_decay={our_key(k) for k in no_decay if k not in dead},
    )
