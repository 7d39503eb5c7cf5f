"""The trainable state of a DeepSpeed engine, whole, through DeepSpeed's public API.

``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` assemble a
parameter's fp32 master copy and Adam moments from whichever ZeRO stage (1-3) or bf16 optimizer holds
them, and the ``safe_set_full_*`` calls write a full tensor back into this rank's partition. With the
full tensors in hand a checkpoint is independent of the number of ranks and of the stage, so resuming
on another world size is plain loading. ZeRO-0 in fp32 has no partitions: the parameters are the
master copies and torch's optimizer keeps the moments. Every function here is a collective (the
getters all-reduce each tensor): call it on every rank.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import nn

from mtlora_dist import comm
from mtlora_dist.checkpoint.format import CheckpointError, describe_tensor_problems, tensor_problems

__all__ = [
    "check_supported",
    "prepare_optimizer_state",
    "gather_trainable",
    "restore_trainable",
    "engine_counters",
    "restore_counters",
    "restore_schedule_position",
]

_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
log = logging.getLogger("mtlora_dist")


def _trainable(engine: Any) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """torch's optimizer under DeepSpeed's wrapper (ZeRO and bf16 wrappers keep it as ``.optimizer``)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _partitioned(engine: Any) -> bool:
    """Whether DeepSpeed holds the fp32 masters and moments (ZeRO 1-3) rather than torch (ZeRO-0, fp32)."""
    return int(engine.zero_optimization_stage()) >= 1


def check_supported(engine: Any) -> None:
    """ZeRO-0 with bf16/fp16 keeps its fp32 masters where no public API reaches them: refuse it early."""
    if not _partitioned(engine) and not isinstance(engine.optimizer, torch.optim.Optimizer):
        raise CheckpointError(
            "checkpoints need deepspeed.zero_stage >= 1 with bf16/fp16 (ZeRO-0 keeps its fp32 "
            "master weights out of reach of DeepSpeed's public API); set deepspeed=zero1, "
            "which costs no memory for adapter-sized state"
        )


def prepare_optimizer_state(engine: Any) -> None:
    """Create Adam's state for every parameter group now, as torch would at the first step.

    ZeRO-1/2 step one parameter group at a time and link each parameter to its slice of the optimizer
    state right after the *first* group's step (DeepSpeed 0.19), when torch has not yet created the
    later groups' state: their moments would then be unreadable through ``safe_get_full_optimizer_state``.
    State created up front is what torch's Adam creates lazily (zeros, step 0), so the math is unchanged.
    """
    inner = _inner_optimizer(engine)
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if state:
                continue
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in _ADAM_MOMENTS + (("max_exp_avg_sq",) if group.get("amsgrad") else ()):
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _moment_keys(engine: Any) -> list[str]:
    """The optimizer's per-element state (exp_avg, exp_avg_sq, ... for Adam), read from torch's state."""
    keys: set[str] = set()
    for state in _inner_optimizer(engine).state.values():
        keys |= {k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    return sorted(keys)


def _optimizer_step(engine: Any) -> int:
    steps = [int(s["step"]) for s in _inner_optimizer(engine).state.values() if "step" in s]
    return max(steps, default=0)


def gather_trainable(engine: Any) -> dict[str, torch.Tensor]:
    """``param/<name>`` (fp32 master), ``<moment>/<name>`` and ``buffer/<name>``, all on the CPU."""
    out: dict[str, torch.Tensor] = {}
    moments = _moment_keys(engine)
    inner = _inner_optimizer(engine)
    partitioned, stepped = _partitioned(engine), _optimizer_step(engine) > 0
    for name, p in _trainable(engine):
        master = safe_get_full_fp32_param(p) if partitioned else p.detach()
        out[f"param/{name}"] = master.float().cpu()
        for key in moments:  # before the first step the moments are zeros (and ZeRO has not linked them)
            if not stepped:
                out[f"{key}/{name}"] = torch.zeros_like(out[f"param/{name}"])
            elif partitioned:
                out[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).float().cpu()
            else:
                out[f"{key}/{name}"] = inner.state[p][key].detach().float().cpu()
    params = {name for name, _ in engine.module.named_parameters()}
    buffers = dict(engine.module.named_buffers())
    for name in engine.module.state_dict():
        if name not in params and name in buffers:
            out[f"buffer/{name}"] = buffers[name].detach().cpu().clone()
    return out


def _ensure_optimizer_state(engine: Any, params: list[nn.Parameter]) -> None:
    """Before its first step an engine has no optimizer state for the setters to write into (ZeRO-1/2
    also link each parameter to its slice of that state only then). Create it
    with one step that changes nothing: zero gradients at learning rate 0; weights, moments and
    counters are all overwritten afterwards. Under ZeRO-3 the backward runs with the parameters
    gathered, as it does inside a forward."""
    import deepspeed

    if _optimizer_step(engine) > 0 or not _partitioned(engine):
        return
    groups = engine.optimizer.param_groups
    lrs = [group["lr"] for group in groups]
    for group in groups:
        group["lr"] = 0.0
    for _ in range(engine.gradient_accumulation_steps()):
        with deepspeed.zero.GatheredParameters(params):
            engine.backward(sum((p * 0).sum() for p in params).float())
        engine.step()
    for group, lr in zip(groups, lrs):
        group["lr"] = lr


def restore_trainable(engine: Any, tensors: dict[str, torch.Tensor], optimizer_step: int) -> None:
    """Write the saved full tensors into this engine, whatever its world size and stage."""
    import deepspeed

    trainable = _trainable(engine)
    missing = sorted(f"param/{n}" for n, _ in trainable if f"param/{n}" not in tensors)
    if missing:
        raise CheckpointError(f"the checkpoint lacks trainable parameters: {missing[:8]}")
    moments = sorted({key.split("/", 1)[0] for key in tensors} - {"param", "buffer"})
    problems = tensor_problems(engine.module, tensors, moments)
    if problems:  # before anything is copied: a refused checkpoint leaves the engine as it was
        raise CheckpointError(describe_tensor_problems(problems))
    _ensure_optimizer_state(engine, [p for _, p in trainable])
    inner, partitioned = _inner_optimizer(engine), _partitioned(engine)
    for name, p in trainable:
        value = tensors[f"param/{name}"]
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # ZeRO-3: re-partitioned on exit
            p.data.copy_(value.to(device=p.device, dtype=p.dtype))
        if hasattr(p, "ds_tensor"):  # ZeRO-3
            _set_zero3_partition(p, value, None)
            for key in moments:
                _set_zero3_partition(p, tensors[f"{key}/{name}"], key)
        elif partitioned:
            safe_set_full_fp32_param(p, value.to(p.device))
            for key in moments:
                safe_set_full_optimizer_state(p, tensors[f"{key}/{name}"].to(p.device), key)
        elif moments:
            state = inner.state[p]
            state.update({key: tensors[f"{key}/{name}"].to(p.device).clone() for key in moments})
            state["step"] = torch.tensor(float(optimizer_step))
    for state in inner.state.values():  # Adam's bias correction counts steps
        if "step" in state:
            state["step"] = (
                torch.full_like(state["step"], optimizer_step)
                if isinstance(state["step"], torch.Tensor)
                else optimizer_step
            )
    buffers = dict(engine.module.named_buffers())
    for key, value in tensors.items():
        if key.startswith("buffer/") and key[len("buffer/") :] in buffers:
            buffer = buffers[key[len("buffer/") :]]
            buffer.data.copy_(value.to(device=buffer.device, dtype=buffer.dtype))


def _set_zero3_partition(param: nn.Parameter, full: torch.Tensor, key: str | None) -> None:
    """This rank's slice of ``full`` into ZeRO-3's fp32 partition (or ``key``'s optimizer state).

    Through the *local* setters: the full ones narrow past the end of a tensor whose last partition is
    padding (any parameter with fewer elements than ranks, such as a one-channel head's bias)."""
    part = param.ds_tensor.numel()
    padded = torch.zeros(part * comm.world_size(), dtype=torch.float32)
    padded[: full.numel()] = full.reshape(-1).float()
    local = padded[comm.rank() * part : (comm.rank() + 1) * part].to(param.ds_tensor.device)
    if key is None:
        safe_set_local_fp32_param(param, local)
    else:
        safe_set_local_optimizer_state(param, local, key)


def engine_counters(engine: Any) -> dict[str, Any]:
    """Step counters, the scheduler and the loss scaler: plain data (JSON)."""
    counters: dict[str, Any] = {
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
        "optimizer_step": _optimizer_step(engine),
    }
    if engine.lr_scheduler is not None:
        counters["lr_scheduler"] = engine.lr_scheduler.state_dict()
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None:
        counters["loss_scaler"] = {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool))}
    return counters


def restore_counters(engine: Any, counters: dict[str, Any]) -> None:
    engine.global_steps = int(counters["global_steps"])
    engine.global_samples = int(counters["global_samples"])
    engine.skipped_steps = int(counters.get("skipped_steps", 0))
    engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()
    if engine.lr_scheduler is not None and "lr_scheduler" in counters:
        restore_schedule_position(engine.lr_scheduler, engine.optimizer.param_groups, counters["lr_scheduler"])
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in counters.get("loss_scaler", {}).items():
        if scaler is not None and hasattr(scaler, key):
            setattr(scaler, key, value)


def restore_schedule_position(scheduler: Any, groups: list[dict], saved: dict[str, Any]) -> None:
    """Move ``scheduler`` to the saved step and set the groups' lrs from *this* run's schedule.

    Learning rates are never restored as numbers: the scheduler built for this run holds the recipe's
    lrs for the current global batch (``optim.lr_scaling``), and only the position (``last_epoch``) comes
    from the checkpoint. One line says when that differs from what the checkpoint ran with (another global
    batch, an import made at another batch size, an edited recipe)."""
    scheduler.last_epoch = int(saved["last_epoch"])
    scheduler._step_count = int(saved.get("_step_count", scheduler.last_epoch + 1))
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:  # not a LambdaLR: its own closed form at the restored position
        lrs = [float(x) for x in scheduler._get_closed_form_lr()]
    else:
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas, strict=True)]
    scheduler._last_lr = lrs
    for group, lr in zip(groups, lrs, strict=True):
        group["lr"] = lr
    before = [float(x) for x in saved.get("base_lrs", [])]
    now = [float(x) for x in scheduler.base_lrs]
    if before and any(abs(a - b) > 1e-12 * max(abs(a), abs(b)) for a, b in zip(before, now, strict=False)):
        log.info(
            "learning rates recomputed from the recipe for this run's global batch, not restored: base lr %.4g "
            "(the checkpoint ran with %.4g); lr at step %d: %.4g",
            now[0], before[0], scheduler.last_epoch, lrs[0],
        )  # fmt: skip
