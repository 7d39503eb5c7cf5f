"""Loss balancing: how the per-task losses become the one scalar the engine back-propagates.

``loss.balancing`` picks a :class:`Balancer`; each multiplies the fixed weights ``w_t`` (task registry
with ``loss_weights`` overrides) by weights of its own (docs/balancing.md has the math):

- ``fixed``: ``sum_t w_t L_t``, the expression the trainer always used (bit for bit).
- ``uncertainty``: torchjd's ``UW`` scalarizer on ``w_t L_t`` (Kendall et al. 2018, learned log-variances
  ``s_t``); the ``s_t`` have an AdamW of their own, stepped with the engine's lr after each applied step.
- ``dwa``: Dynamic Weight Average (Liu et al. 2019), ``T softmax(r / temperature)`` of the ratios ``r`` of
  the last two windows' mean losses, averaged over every rank and micro-batch.
- ``upgrad`` / ``mgda``: torchjd's Gramian weightings of the per-task gradients with respect to a shared
  activation (``loss.gramian.module``), the Gramian summed over ranks.

Every rank computes the same weights: what they depend on (gradients of ``s_t``, window means, the
Gramian) is all-reduced first, and every rank runs the same collectives in the same order. A balancer
is a checkpoint piece (``state_dict`` / ``load_state_dict``), saved once (its state is the same on every
rank); a resumed run continues with the weights it would have had.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlora_dist import comm

__all__ = ["Balancer", "BalancerMismatchError", "DWA", "Fixed", "GramianWeighting", "Uncertainty", "build_balancer"]

METHODS = ("fixed", "uncertainty", "dwa", "upgrad", "mgda")


class BalancerMismatchError(ValueError):
    """A checkpoint's balancer state is of another method or task list than this run's."""


class Balancer:
    """Fixed weights; subclasses add their own. Called by the trainer once per micro-batch (``combine``)
    and once per optimizer step after ``engine.step()`` (``end_step``), on every rank."""

    name = "fixed"

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float], device: torch.device | str = "cpu") -> None:
        self.tasks = tuple(tasks)
        self.base = {t: float(weights[t]) for t in self.tasks}  # Python floats: today's total, bit for bit
        self.device = torch.device(device)
        self.engine: Any = None
        self._used = self._as_logged(torch.ones(len(self.tasks), device=self.device))

    def attach(self, engine: Any) -> None:
        """Called once the engine exists (forward hooks, the engine's lr)."""
        self.engine = engine

    def combine(
        self, per_task: Mapping[str, Tensor], recompute: Callable[[str, Tensor], Tensor] | None = None
    ) -> Tensor:
        """The objective of one micro-batch from its attached per-task losses; ``recompute(task, pred)`` gives
        a task's loss again on other predictions (the Gramian weightings use it)."""
        device = per_task[self.tasks[0]].device
        if device != self.device:  # a MultiTaskLoss made without a device: its weights follow the losses
            self.device, self._used = device, {t: w.to(device) for t, w in self._used.items()}
        return torch.stack([self.base[t] * per_task[t] for t in self.tasks]).sum()

    def end_step(self) -> None:
        """After the optimizer step: update what the next step's weights depend on."""

    def weights_used(self) -> dict[str, Tensor]:
        """The multiplier of each unweighted task loss in the last micro-batch's objective (device scalars)."""
        return self._used

    def _as_logged(self, own: Tensor) -> dict[str, Tensor]:
        return {t: own[i].detach() * self.base[t] for i, t in enumerate(self.tasks)}

    def _weighted(self, per_task: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([self.base[t] * per_task[t] for t in self.tasks])  # (T,) attached

    # -- checkpoint piece ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "tasks": list(self.tasks)}

    def load_state_dict(self, state: dict[str, Any], same_world: bool) -> None:
        saved = state.get("method", "fixed")
        if saved != self.name or list(state.get("tasks", self.tasks)) != list(self.tasks):
            raise BalancerMismatchError(
                f"the checkpoint was trained with loss.balancing={saved} on tasks {state.get('tasks')}; this run "
                f"has loss.balancing={self.name} on {list(self.tasks)}. Resume with the run's own loss settings, "
                "or start a new run_dir"
            )


Fixed = Balancer


def _mean_over_ranks(local: Tensor) -> Tensor:
    """``local`` averaged over ranks, on ``local``'s device: the same tensor on every rank."""
    return comm.all_reduce(local.clone()).to(local.device) / comm.world_size()


class Uncertainty(Balancer):
    """torchjd's ``UW``: ``sum_t exp(-s_t) w_t L_t / 2 + s_t / 2``.

    The model's gradient comes from the engine's backward of that objective with ``s`` held constant;
    ``s``'s own gradient, ``(1 - exp(-s_t) w_t L_t) / 2``, from the detached losses, averaged over the
    step's micro-batches and the ranks, so every rank takes the same AdamW step (skipped with the
    engine's, e.g. on an fp16 overflow). The lr is the engine's lr of that step unless ``lr`` is set."""

    name = "uncertainty"

    def __init__(self, tasks, weights, device="cpu", *, init: float = 0.0, lr: float | None = None,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8) -> None:  # fmt: skip
        from torchjd.scalarization import UW

        super().__init__(tasks, weights, device)
        self.uw = UW(len(self.tasks)).to(self.device)
        with torch.no_grad():
            self.uw.log_var.fill_(init)
        self.lr = lr
        self.optimizer = torch.optim.AdamW(
            self.uw.parameters(), lr=lr or 0.0, betas=tuple(betas), eps=eps, weight_decay=0.0
        )
        self._grad = torch.zeros(len(self.tasks), device=self.device)
        self._micro = 0
        self._step_lr = lr or 0.0
        self._used = self._as_logged(0.5 * torch.exp(-self.uw.log_var.detach()))

    @property
    def log_var(self) -> Tensor:
        return self.uw.log_var

    def combine(self, per_task: Mapping[str, Tensor], recompute=None) -> Tensor:
        values = self._weighted(per_task)
        if self._micro == 0 and self.lr is None and self.engine is not None:
            self._step_lr = float(self.engine.get_lr()[0])  # the lr the engine applies in this step
        self.log_var.requires_grad_(False)
        try:
            total = self.uw(values)  # s constant: the engine's backward reaches the model only
        finally:
            self.log_var.requires_grad_(True)
        (grad,) = torch.autograd.grad(self.uw(values.detach()), self.log_var)
        self._grad += grad
        self._micro += 1
        self._used = self._as_logged(0.5 * torch.exp(-self.log_var.detach()))
        return total

    def end_step(self) -> None:
        grad = _mean_over_ranks(self._grad / max(1, self._micro))
        self._grad.zero_()
        self._micro = 0
        if self.engine is not None and not self.engine.was_step_applied():
            return  # the model's step was skipped (fp16 overflow): so is s's
        for group in self.optimizer.param_groups:
            group["lr"] = self._step_lr
        self.log_var.grad = grad
        self.optimizer.step()
        self.log_var.grad = None

    def state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state.get(self.log_var, {})
        return {
            **super().state_dict(),
            "log_var": self.log_var.detach().clone(),
            "adam": {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()},
        }

    def load_state_dict(self, state: dict[str, Any], same_world: bool) -> None:
        super().load_state_dict(state, same_world)
        with torch.no_grad():
            self.log_var.copy_(state["log_var"].to(self.device))
        groups = self.optimizer.state_dict()["param_groups"]
        adam = dict(state.get("adam") or {})
        self.optimizer.load_state_dict({"state": {0: adam} if adam else {}, "param_groups": groups})
        self._used = self._as_logged(0.5 * torch.exp(-self.log_var.detach()))


class DWA(Balancer):
    """Dynamic Weight Average: ``lambda = T softmax(r / temperature)``, ``r_t = A_t(k-1) / A_t(k-2)``.

    ``A_t(k)`` is task t's mean unweighted loss over window k (``window`` optimizer steps, an epoch by
    default), over every micro-batch of every rank: each step's mean is all-reduced (T numbers) so the
    window sums, and the weights, are the same on every rank. Uniform weights for the first two windows.
    torchjd's ``DWA`` scalarizer has the same formula but sums one process's losses and keeps its
    history in private attributes; ``tests/tasks/test_balancing.py`` checks ours gives its weights."""

    name = "dwa"

    def __init__(self, tasks, weights, device="cpu", *, temperature: float = 2.0, window: int = 1) -> None:
        super().__init__(tasks, weights, device)
        if window < 1:
            raise ValueError(f"DWA needs a window of at least one step, got {window}")
        self.temperature, self.window = float(temperature), int(window)
        n = len(self.tasks)
        self._step_sum = torch.zeros(n, device=self.device)
        self._micro = 0
        self.window_sum = torch.zeros(n, device=self.device)
        self.window_steps = 0
        self.history: list[Tensor] = []  # the last two windows' means, oldest first
        self.lam = torch.ones(n, device=self.device)
        self._used = self._as_logged(self.lam)

    def combine(self, per_task: Mapping[str, Tensor], recompute=None) -> Tensor:
        values = self._weighted(per_task)
        self._step_sum += torch.stack([per_task[t].detach().float() for t in self.tasks])
        self._micro += 1
        return (self.lam * values).sum()

    def end_step(self) -> None:
        self.window_sum += _mean_over_ranks(self._step_sum / max(1, self._micro))
        self._step_sum.zero_()
        self._micro = 0
        self.window_steps += 1
        if self.window_steps < self.window:
            return
        self.history = [*self.history, self.window_sum / self.window_steps][-2:]
        self.window_sum = torch.zeros_like(self.window_sum)
        self.window_steps = 0
        if len(self.history) == 2:
            rates = self.history[1] / self.history[0]
            self.lam = len(self.tasks) * torch.softmax(rates / self.temperature, dim=0)
        self._used = self._as_logged(self.lam)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "window_sum": self.window_sum.clone(),
            "window_steps": self.window_steps,
            "history": [h.clone() for h in self.history],
            "lam": self.lam.clone(),
        }

    def load_state_dict(self, state: dict[str, Any], same_world: bool) -> None:
        super().load_state_dict(state, same_world)
        self.window_sum = state["window_sum"].to(self.device)
        self.window_steps = int(state["window_steps"])
        self.history = [h.to(self.device) for h in state["history"]]
        self.lam = state["lam"].to(self.device)
        self._used = self._as_logged(self.lam)


class GramianWeighting(Balancer):
    """A torchjd Gramian weighting of the per-task gradients with respect to a shared activation ``z``.

    Per micro-batch: ``g_t = d(w_t L_t)/dz`` for each task (``autograd.grad``, one partial backward each,
    no parameter gradients), ``G_ij = <g_i, g_j>`` summed over ranks (the Gramian of the gradients of the
    rank-mean objective, up to the factor 1/W^2 that no weighting depends on), ``alpha = weighting(G)`` on
    the host (torchjd's solvers run in numpy), and the objective ``sum_t alpha_t w_t L_t``, back-propagated
    by the engine as usual. ``z`` is the output of ``module`` (the backbone's patch embedding by default:
    the one tensor every task's loss depends on wholly). A non-finite Gramian (an fp16 overflow) gives
    ``alpha = 1``, on every rank alike. Every ZeRO stage: under ZeRO-3 each partial backward gathers the
    partitioned weights again (:func:`_zero3_rearm`)."""

    def __init__(self, tasks, weights, device="cpu", *, weighting: str = "upgrad", module: str = "backbone.patch_embed") -> None:  # fmt: skip
        from torchjd.aggregation import MGDAWeighting, UPGradWeighting

        super().__init__(tasks, weights, device)
        self.name = weighting
        n = len(self.tasks)
        if weighting == "upgrad":  # pref_vector of ones: sum of the projected gradients (= sum when none conflict)
            self.weighting, self.scale = UPGradWeighting(pref_vector=torch.ones(n, dtype=torch.float64)), 1.0
        elif weighting == "mgda":  # min-norm convex weights, scaled to sum to T like the others
            self.weighting, self.scale = MGDAWeighting(), float(n)
        else:
            raise ValueError(f"unknown Gramian weighting '{weighting}'; valid: upgrad, mgda")
        self.module = module
        self._z: Tensor | None = None
        self._outputs: dict[str, Tensor] | None = None
        self._hooks: list = []

    def attach(self, engine: Any) -> None:
        super().attach(engine)
        root = getattr(engine, "module", engine)
        try:
            target = root.get_submodule(self.module)
        except AttributeError:
            names = [n for n, _ in root.named_modules() if n and n.count(".") < 2]
            raise ValueError(
                f"loss.gramian.module '{self.module}' is not a module of the model; pass one whose output every "
                f"task depends on, e.g. one of {names[:8]}"
            ) from None
        self._hooks = [target.register_forward_hook(self._capture_z), root.register_forward_hook(self._fork_outputs)]

    def _capture_z(self, module, inputs, output):
        if not (torch.is_grad_enabled() and isinstance(output, Tensor)):
            return None
        if not output.requires_grad:  # nothing upstream trains (frozen patch embedding): z becomes a leaf
            output = output.detach().requires_grad_(True)
        self._z = output
        return output

    def _fork_outputs(self, module, inputs, output):
        """Keep the model's own outputs and hand the engine views of them. DeepSpeed (0.18+) hooks the
        tensors its forward returns and treats any backward through them as its own (it scales the
        gradient and reduces the parameter gradients when it ends): the per-task ``autograd.grad`` runs
        from losses recomputed on the originals, so it never meets those hooks."""
        if not (torch.is_grad_enabled() and isinstance(output, dict)):
            return None
        self._outputs = output
        return {t: o.view_as(o) for t, o in output.items()}

    def combine(
        self, per_task: Mapping[str, Tensor], recompute: Callable[[str, Tensor], Tensor] | None = None
    ) -> Tensor:
        z, outputs, self._z, self._outputs = self._z, self._outputs, None, None
        if z is None:
            raise RuntimeError(
                f"loss.balancing={self.name}: the forward did not pass through '{self.module}' with gradients on; "
                "set loss.gramian.module to a module of the training forward"
            )
        values = self._weighted(per_task)
        if recompute is not None and outputs is not None:  # the same losses, on the un-hooked outputs
            probes = [self.base[t] * recompute(t, outputs[t].float()) for t in self.tasks]
        else:
            probes = list(values)
        rearm = _zero3_rearm(getattr(self.engine, "module", None))
        grads = []
        for v in probes:
            grads.append(torch.autograd.grad(v, z, retain_graph=True, allow_unused=True)[0])
            rearm()
        jacobian = torch.stack([(torch.zeros_like(z) if g is None else g).reshape(-1).float() for g in grads])
        gramian = comm.all_reduce(jacobian @ jacobian.T).double().cpu()  # a host read: the solver is numpy
        alpha = torch.ones(len(self.tasks), dtype=torch.float64)
        if torch.isfinite(gramian).all():
            alpha = self.weighting(gramian).to(torch.float64) * self.scale
        alpha = alpha.to(device=values.device, dtype=values.dtype)
        self._used = self._as_logged(alpha)
        return (alpha * values).sum()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


# DeepSpeed ZeRO-3's per-module backward counters (deepspeed/runtime/zero/parameter_offload.py): the
# weights fetches still owed to backward passes, and the input gradients a module awaits before it
# releases its weights again.
_ZERO3_COUNTERS = ("applied_pre_backward_ref_cnt", "ds_grads_remaining")


def _zero3_rearm(root: torch.nn.Module | None) -> Callable[[], None]:
    """``rearm()``, which lets one more backward pass run over the last forward under ZeRO-3.

    ZeRO-3 gathers a module's partitioned weights for one backward per forward (a per-module count set
    by the forward, used up by the backward, which releases the weights when its input gradients are
    all in). Each per-task partial backward is followed by ``rearm()``, which puts the counts back as the
    forward left them, so the next one and the engine's own backward gather the weights again. Without
    ZeRO-3 no module carries the counters and ``rearm`` does nothing."""
    saved = []
    for module in root.modules() if root is not None else ():
        counts = {k: module.__dict__[k] for k in _ZERO3_COUNTERS if k in module.__dict__}
        if counts:
            saved.append((module, counts))

    def rearm() -> None:
        for module, counts in saved:
            module.__dict__.update(counts)

    return rearm


def build_balancer(
    cfg: Any,
    tasks: Sequence[str],
    weights: Mapping[str, float],
    *,
    steps_per_epoch: int = 1,
    device: torch.device | str = "cpu",
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Balancer:
    """The balancer ``cfg.balancing`` names (``cfg``: the run's ``LossConfig``), on ``device``; ``weights``
    are the fixed weights it multiplies; ``betas``/``eps`` those of the run's AdamW (uncertainty)."""
    method = str(cfg.balancing)
    if method == "fixed":
        return Balancer(tasks, weights, device)
    if method == "uncertainty":
        u = cfg.uncertainty
        return Uncertainty(tasks, weights, device, init=u.init, lr=u.lr, betas=betas, eps=eps)
    if method == "dwa":
        return DWA(tasks, weights, device, temperature=cfg.dwa.temperature, window=cfg.dwa.window or steps_per_epoch)
    if method in ("upgrad", "mgda"):
        return GramianWeighting(tasks, weights, device, weighting=method, module=cfg.gramian.module)
    raise ValueError(f"unknown loss.balancing '{method}'; valid: {', '.join(METHODS)}")
