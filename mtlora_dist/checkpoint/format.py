"""What a checkpoint is on disk: folder names, the completion marker, fingerprints, and the split of
state into tensors (safetensors) and plain data (JSON). Nothing here is ever unpickled.

    <run_dir>/checkpoints/step_00000100/trainable.safetensors   param/<name> (fp32), <moment>/<name>, buffer/<name>
    <run_dir>/checkpoints/step_00000100/client.safetensors      per-rank tensors (RNG states): rank<r>/<piece>/<key>
    <run_dir>/checkpoints/step_00000100/state.json              engine counters, scheduler, per-rank plain data
    <run_dir>/checkpoints/step_00000100/COMPLETE.json           marker: every file with size and sha256, written last
    <run_dir>/checkpoints/latest                                name of the newest complete one (for people)

The trainable state is gathered whole (it is small: adapters, heads and their Adam moments), so a
checkpoint does not depend on the number of ranks or the ZeRO stage that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

import safetensors.torch
import torch
from torch import nn

__all__ = [
    "FORMAT",
    "MARKER",
    "LATEST",
    "TRAINABLE",
    "CLIENT",
    "STATE",
    "CheckpointError",
    "describe_tensor_problems",
    "tensor_problems",
    "CheckpointMismatchError",
    "ChecksumMismatchError",
    "short_list",
    "step_tag",
    "tag_step",
    "frozen_fingerprint",
    "trainable_shapes",
    "normalize",
    "fingerprint_differences",
    "pack",
    "unpack",
    "tensors_to_bytes",
    "tensors_from_bytes",
    "sha256_bytes",
]

FORMAT = "mtlora-dist-checkpoint/2"
MARKER = "COMPLETE.json"
LATEST = "latest"
TRAINABLE = "trainable.safetensors"
CLIENT = "client.safetensors"
STATE = "state.json"
_TAG_RE = re.compile(r"^step_(\d{8,})$")
_MAX_LISTED = 5  # per kind of difference: the config keys, not 200 tensor names, tell what changed


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written for another model or configuration."""


class ChecksumMismatchError(CheckpointError):
    """A file's bytes differ from what its marker lists."""


def step_tag(step: int) -> str:
    """Folder name of the checkpoint taken after ``step`` optimizer steps (sorts by step as text too)."""
    return f"step_{int(step):08d}"


def tag_step(tag: str) -> int:
    """The step of a checkpoint folder name, -1 for anything else."""
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else -1


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- fingerprints ---------------------------------------------------------------------------------
def frozen_fingerprint(model: nn.Module) -> str:
    """sha256 over name, dtype, shape and bytes of every frozen parameter of ``model``.

    Checkpoints hold no frozen weights, so a resumed run is only right if the backbone was rebuilt from
    the same pretrained source (DeepSpeed #3090 and #6771 report frozen weights silently changing on
    resume). Not meaningful under ZeRO-3, whose parameters are partitioned across ranks.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        tensor = param.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(param.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def trainable_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Full shapes; under ZeRO-3 a parameter is an empty placeholder and ``ds_shape`` holds its shape."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters() if p.requires_grad}


def normalize(value: Any) -> Any:
    """JSON round trip, so tuples and lists (or an OmegaConf node and its dict) compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix[:-1] or "<root>": value}


def short_list(items: Iterable[str]) -> str:
    """At most a few sorted items, then how many more (messages stay one short line)."""
    items = sorted(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable lines describing how two fingerprints differ (empty when they match)."""
    lines = []
    saved_params, params = saved.get("trainable", {}), current.get("trainable", {})
    missing = set(params) - set(saved_params)
    unexpected = set(saved_params) - set(params)
    mismatched = [
        f"{n}: checkpoint {saved_params[n]} vs model {params[n]}"
        for n in sorted(set(params) & set(saved_params))
        if saved_params[n] != params[n]
    ]
    if missing:
        lines.append(f"missing keys (trainable in this model, not in the checkpoint): {short_list(missing)}")
    if unexpected:
        lines.append(f"unexpected keys (in the checkpoint, not trainable in this model): {short_list(unexpected)}")
    if mismatched:
        lines.append(f"shape mismatches: {short_list(mismatched)}")
    saved_cfg, cfg = _flatten(saved.get("config", {})), _flatten(current.get("config", {}))
    changed = [
        f"{k}: checkpoint {saved_cfg.get(k, '<absent>')!r} vs this run {cfg.get(k, '<absent>')!r}"
        for k in sorted(set(saved_cfg) | set(cfg))
        if saved_cfg.get(k, "<absent>") != cfg.get(k, "<absent>")
    ]
    if changed:
        lines.append(f"config differences: {short_list(changed)}")
    return lines


# -- tensors and plain data -----------------------------------------------------------------------
_TENSOR_REF = "__tensor__"


def pack(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` with every tensor moved into ``tensors`` (under ``prefix/...``) and replaced by a
    reference; what remains must be JSON (dicts with string keys, lists, str, int, float, bool, None)."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {_TENSOR_REF: prefix}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise CheckpointError(f"state at '{prefix}' has non-string keys; checkpoints hold JSON and tensors only")
        return {k: pack(v, f"{prefix}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [pack(v, f"{prefix}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise CheckpointError(
        f"state at '{prefix}' is a {type(value).__name__}; checkpoints hold JSON and tensors only "
        "(give the piece a state_dict of plain data and tensors)"
    )


def unpack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`pack`."""
    if isinstance(value, dict):
        if set(value) == {_TENSOR_REF}:
            return tensors[value[_TENSOR_REF]]
        return {k: unpack(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [unpack(v, tensors) for v in value]
    return value


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """safetensors only: a file that is anything else is an error, never code."""
    try:
        return safetensors.torch.load(data)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"not a safetensors file ({type(err).__name__}: {err})") from err


def tensor_problems(module: nn.Module, tensors: dict[str, torch.Tensor], moments: list[str] = ()) -> list[str]:
    """What keeps a checkpoint's ``param/``, ``<moment>/`` and ``buffer/`` tensors from being copied into
    ``module``: a missing tensor, another shape (the full shape, also under ZeRO-3), or a dtype that is not
    floating point. Checked before anything is copied, so a refused checkpoint leaves the model as it was."""
    expected = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            shape = list(getattr(p, "ds_shape", p.shape))
            expected.update({f"{key}/{name}": (shape, True) for key in ("param", *moments)})
    buffers = dict(module.named_buffers())
    for key in tensors:
        if key.startswith("buffer/") and key[len("buffer/") :] in buffers:
            buffer = buffers[key[len("buffer/") :]]
            expected[key] = (list(buffer.shape), buffer.is_floating_point())
    problems = []
    for key, (shape, floating) in expected.items():
        value = tensors.get(key)
        if value is None:
            problems.append(f"{key} is missing")
        elif list(value.shape) != shape:
            problems.append(f"{key} has shape {list(value.shape)}, the model's is {shape}")
        elif floating and not value.is_floating_point():
            problems.append(f"{key} is {value.dtype}, not floating point")
    return problems


def describe_tensor_problems(problems: list[str], where: str = "the checkpoint") -> str:
    return (
        f"the tensors of {where} do not fit this model ({len(problems)} problem(s)): {'; '.join(problems[:6])}; its "
        "files were changed or come from another model: use another checkpoint or start a new run_dir"
    )
