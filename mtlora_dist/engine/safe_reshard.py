"""Resuming a ZeRO-1/2 run on a different number of data-parallel ranks.

ZeRO-1/2 splits the fp32 master weights and the optimizer moments into one flat slice per rank, and
DeepSpeed 0.19's ``load_checkpoint`` refuses to load optimizer shards written by another number of ranks
("Automatic adjustment of ZeRO's optimizer state partitioning ... is not currently supported"). Its
alternatives do not fit here: ``elastic_checkpoint`` is unreachable behind that same check (and needs
the step in the param groups, which ``torch.optim.AdamW`` keeps in its state), and the universal format
needs an offline ``ds_to_universal`` pass that unpickles with ``weights_only=False``.

The shards already say where every parameter lies: ``param_slice_mappings`` gives, per rank and param
group, each parameter's ``(start, numel)`` inside that rank's flat slice. Since the trainable state of an
MTLoRA model is small (well under 1 GB), every rank reads all shards, joins each parameter's pieces in
rank order into a full tensor, and copies out the piece its new slice holds, at the place DeepSpeed's
``_hp_mapping`` of each parameter gives (the mapping behind ``deepspeed.utils.safe_set_full_fp32_param``).
Nothing extra is saved for this, so a checkpoint stays at the size of the trainable state.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from deepspeed.checkpoint.constants import (
    BASE_OPTIMIZER_STATE,
    BASE_OPTIMIZER_STATE_STEP,
    OPTIMIZER_STATE_DICT,
    PARAM_SLICE_MAPPINGS,
    SINGLE_PARTITION_OF_FP32_GROUPS,
)

__all__ = ["FullZeroState", "gather_zero_shards", "restore_zero_state"]


@dataclass
class FullZeroState:
    """Rank-count-independent optimizer state of a ZeRO-1/2 run, as flat fp32 tensors keyed by name."""

    fp32: dict[str, torch.Tensor] = field(default_factory=dict)
    optim: dict[str, dict[str, torch.Tensor]] = field(default_factory=lambda: defaultdict(dict))
    group_scalars: list[dict[str, Any]] = field(default_factory=list)  # e.g. Adam's step, per param group
    param_groups: list[dict[str, Any]] | None = None  # hyperparameters per group (lr, betas, ...)


def gather_zero_shards(shards: Sequence[dict[str, Any]]) -> FullZeroState:
    """Join the per-rank ZeRO-1/2 shards (ordered by data-parallel rank) into full per-parameter tensors."""
    states = [shard[OPTIMIZER_STATE_DICT] for shard in shards]
    num_groups = len(states[0][SINGLE_PARTITION_OF_FP32_GROUPS])
    full = FullZeroState()
    for g in range(num_groups):
        pieces: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        for state in states:
            _collect_group_pieces(state, g, pieces)
        for name, by_key in pieces.items():
            full.fp32[name] = torch.cat(by_key.pop("__fp32__"))
            full.optim[name] = {key: torch.cat(parts) for key, parts in by_key.items()}
        full.group_scalars.append(_group_scalars(states, g))
    full.param_groups = _param_groups(states[0])
    return full


def _group_state(state: dict[str, Any], g: int) -> dict[str, Any]:
    """Optimizer state of param group ``g`` of one shard: a torch ``state_dict`` (DeepSpeed's default,
    "rigid") keys it by group index; an elastic checkpoint stores a list."""
    base = state[BASE_OPTIMIZER_STATE]
    if isinstance(base, dict):
        per_param = base["state"]
        return per_param.get(g, per_param.get(str(g), {}))
    return base[g]


def _collect_group_pieces(state: dict[str, Any], g: int, pieces: dict) -> None:
    """Append this shard's slice of every parameter of group ``g`` (master weight and moments)."""
    flat_fp32 = state[SINGLE_PARTITION_OF_FP32_GROUPS][g]
    group_state = _group_state(state, g)
    # Moments span the rank's slice (plus alignment padding on the last rank); scalars such as step don't.
    moments = {k: v for k, v in group_state.items()
               if torch.is_tensor(v) and v.dim() == 1 and v.numel() >= flat_fp32.numel()}
    for name, address in state[PARAM_SLICE_MAPPINGS][g].items():
        pieces[name]["__fp32__"].append(flat_fp32.narrow(0, address.start, address.numel))
        for key, flat in moments.items():
            pieces[name][key].append(flat.narrow(0, address.start, address.numel))


def _group_scalars(states: Sequence[dict[str, Any]], g: int) -> dict[str, Any]:
    """Non-partitioned entries (Adam's ``step``) of group ``g``; every rank must agree on them."""
    scalars = []
    for state in states:
        flat_fp32 = state[SINGLE_PARTITION_OF_FP32_GROUPS][g]
        group_state = _group_state(state, g)
        scalars.append({k: v for k, v in group_state.items()
                        if not (torch.is_tensor(v) and v.dim() == 1 and v.numel() >= flat_fp32.numel())})
        if BASE_OPTIMIZER_STATE_STEP in state:
            scalars[-1].setdefault("step", state[BASE_OPTIMIZER_STATE_STEP])
    first = scalars[0]
    for other in scalars[1:]:
        for key, value in first.items():
            if key in other and not _same(value, other[key]):
                raise ValueError(f"ZeRO shards disagree on optimizer '{key}' of param group {g}: "
                                 f"{value} vs {other[key]}; the shards come from different steps")
    return first


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


def _param_groups(state: dict[str, Any]) -> list[dict[str, Any]] | None:
    base = state[BASE_OPTIMIZER_STATE]
    if isinstance(base, dict) and "param_groups" in base:
        return [{k: v for k, v in group.items() if k != "params"} for group in base["param_groups"]]
    return None


def restore_zero_state(engine: Any, full: FullZeroState) -> None:
    """Write ``full`` into this rank's slices of a ZeRO-1/2 engine.

    Call after ``engine.load_checkpoint(..., load_optimizer_states=False)`` has restored the module weights
    and the lr scheduler. The optimizer state may not exist yet (torch's Adam creates it at the first step),
    so it is created here with the checkpoint's keys, then every parameter's piece is copied to where this
    engine's ``_hp_mapping`` (DeepSpeed's record of each parameter's place in the local slice) says it
    lives. Ends with a collective (``update_lp_params``) that copies the fp32 masters into the module weights.
    """
    optimizer = engine.optimizer
    base = optimizer.optimizer
    if len(base.param_groups) != len(full.group_scalars):
        raise ValueError(f"the checkpoint has {len(full.group_scalars)} optimizer param groups, this engine "
                         f"{len(base.param_groups)}: build the param groups the way the saving run did")
    for g, group in enumerate(base.param_groups):
        _restore_group(base.state[group["params"][0]], group["params"][0], group, full, g)
    states = [base.state[group["params"][0]] for group in base.param_groups]
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            _restore_param(name, param, full, states)
    optimizer.update_lp_params()


def _restore_group(state: dict[str, Any], flat: torch.Tensor, group: dict[str, Any], full: FullZeroState,
                   g: int) -> None:
    """Create the group's moments (zeros, filled per parameter next) and copy its scalars and hyperparameters."""
    moment_keys = {key for by_key in full.optim.values() for key in by_key}
    for key in moment_keys:
        if not (torch.is_tensor(state.get(key)) and state[key].shape == flat.shape):
            state[key] = torch.zeros_like(flat)
    for key, value in full.group_scalars[g].items():
        state[key] = value.clone() if torch.is_tensor(value) else value
    if full.param_groups is not None:
        group.update(full.param_groups[g])


def _restore_param(name: str, param: torch.nn.Parameter, full: FullZeroState, states: list[dict[str, Any]]) -> None:
    """Copy this rank's piece of one parameter: fp32 master and each moment."""
    if name not in full.fp32:
        raise KeyError(f"trainable parameter {name} is not in the checkpoint's ZeRO shards")
    if full.fp32[name].numel() != param.numel():
        raise ValueError(f"{name}: the checkpoint holds {full.fp32[name].numel()} values, the model {param.numel()}")
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:  # no piece of this parameter lives on this rank
        return
    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
    mapping.hp_fragment.data.copy_(full.fp32[name].narrow(0, lp.start, lp.numel))
    state = states[mapping.param_group_index]
    for key, value in full.optim[name].items():
        state[key].narrow(0, hp.start, hp.numel).copy_(value.narrow(0, lp.start, lp.numel))
