"""MTLoRA linear layer: a frozen ``nn.Linear`` plus task-agnostic and task-specific low-rank branches.

Math (spec Part B §1.1): with the frozen path ``P = W x + b`` and ``x~ = dropout(x)``,

* shared (TA-LoRA) output: ``P + s_sh * B_sh A_sh x~``
* task ``t`` (TS-LoRA) output: ``P + s_t * B_t A_t z_t`` where ``z_t`` is the task's own input when
  the layer receives stacked task streams, else ``x~``.

Modes change the two rows: ``matrixv2`` adds the shared delta to every task output, ``addition``
replaces the shared branch with ``P + LayerNorm(sum_t (P + U_t))``, ``lora_only`` has no task branches.
Scales multiply the low-rank product as is (no alpha / r), as the official code does.

Stream layout: a layer with task branches returns the shared stream followed by one stream per task,
stacked along the batch axis (``(1+T)*B, ..., d_out``, stream-major). With ``task_input=True`` it
also *receives* that layout; the frozen weight then only sees the shared stream (stream 0) and each
task's low-rank branch sees its own stream.

The task branches are batched: one GEMM over all task A matrices when the input is shared, one
``bmm`` over tasks when each task has its own input; no per-task Python loop in ``forward``.
Training runs through the hand-written autograd ops of :mod:`mtlora_dist.adapters.fused` (fewer
passes over the activations, a cheap dropout draw); ``addition`` mode, whose shared output is a
LayerNorm over the task outputs, is composed from ordinary torch ops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlora_dist.adapters.config import SHARED_MODES
from mtlora_dist.adapters.dropout import LoRADropout
from mtlora_dist.adapters.fused import lora_linear, task_lora_linear

__all__ = ["MTLoRALinear", "SHARED_MODES"]


def _per_task(value: float | int | Mapping[str, float | int], tasks: Sequence[str], what: str) -> list:
    if isinstance(value, Mapping):
        missing = [t for t in tasks if t not in value]
        if missing:
            raise ValueError(f"{what} has no entry for task(s) {missing}; give one per task or a single number")
        return [value[t] for t in tasks]
    return [value] * len(tasks)


class MTLoRALinear(nn.Linear):
    """``nn.Linear`` with MTLoRA branches. ``weight``/``bias`` keep their names so timm checkpoints
    load unchanged; every adapter tensor is named ``lora_*``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        shared_rank: int = 0,
        tasks: Sequence[str] = (),
        task_rank: int | Mapping[str, int] = 0,
        shared_scale: float = 4.0,
        task_scale: float | Mapping[str, float] = 4.0,
        dropout: float = 0.0,
        trainable_scale_shared: bool = False,
        trainable_scale_per_task: bool = False,
        mode: str = "matrix",
        task_input: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        mode = "addition" if mode == "add" else mode
        if mode not in SHARED_MODES:
            raise ValueError(f"unknown MTLoRA mode '{mode}'; valid modes: {list(SHARED_MODES)}")
        if mode == "lora_only":
            tasks = ()
        self.mode = mode
        self.tasks = tuple(tasks)
        self.task_input = bool(task_input) and bool(self.tasks)
        self.merged = False
        self.lora_dropout = LoRADropout(dropout)
        dd = {"device": device, "dtype": dtype}

        self.shared_rank = int(shared_rank) if mode != "addition" else 0
        if self.shared_rank > 0:
            self.lora_shared_A = nn.Parameter(torch.empty(self.shared_rank, in_features, **dd))
            self.lora_shared_B = nn.Parameter(torch.zeros(out_features, self.shared_rank, **dd))
            if trainable_scale_shared:
                self.lora_shared_scale = nn.Parameter(torch.tensor([float(shared_scale)], **dd))
            else:
                self.register_buffer("lora_shared_scale", torch.tensor([float(shared_scale)], **dd))
        if mode == "addition" and self.tasks:
            self.lora_norm = nn.LayerNorm(out_features, **dd)

        self.task_ranks = [int(r) for r in _per_task(task_rank, self.tasks, "task_rank")]
        if any(r <= 0 for r in self.task_ranks):
            raise ValueError(f"task ranks must be positive, got {dict(zip(self.tasks, self.task_ranks))}")
        if self.tasks:
            self.lora_tasks_A = nn.ParameterDict(
                {t: nn.Parameter(torch.empty(r, in_features, **dd)) for t, r in zip(self.tasks, self.task_ranks)}
            )
            self.lora_tasks_B = nn.ParameterDict(
                {t: nn.Parameter(torch.zeros(out_features, r, **dd)) for t, r in zip(self.tasks, self.task_ranks)}
            )
            scales = [float(s) for s in _per_task(task_scale, self.tasks, "task_scale")]
            if trainable_scale_per_task:
                self.lora_task_scale = nn.ParameterDict(
                    {t: nn.Parameter(torch.tensor([s], **dd)) for t, s in zip(self.tasks, scales)}
                )
            else:
                self.register_buffer("lora_task_scale", torch.tensor(scales, **dd))
        self.reset_lora_parameters()

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> MTLoRALinear:
        """Wrap an existing linear layer, sharing (not copying) its frozen weight and bias."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **kwargs,
        )
        layer.weight = linear.weight
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)), B = 0: at init every stream equals the frozen output."""
        for a in self._task_and_shared_A():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in self._task_and_shared_B():
            nn.init.zeros_(b)

    def _task_and_shared_A(self) -> list[nn.Parameter]:
        out = [self.lora_shared_A] if self.shared_rank else []
        return out + (list(self.lora_tasks_A.values()) if self.tasks else [])

    def _task_and_shared_B(self) -> list[nn.Parameter]:
        out = [self.lora_shared_B] if self.shared_rank else []
        return out + (list(self.lora_tasks_B.values()) if self.tasks else [])

    @property
    def num_streams(self) -> int:
        """Streams this layer emits: 1, or the shared stream plus one per task."""
        return 1 + len(self.tasks)

    # ----------------------------------------------------------------------------------------------
    def shared_delta(self, x: Tensor) -> Tensor:
        """``s_sh * B_sh A_sh x`` for an already dropped-out input."""
        delta = F.linear(F.linear(x, self.lora_shared_A), self.lora_shared_B)
        return delta * self.lora_shared_scale.to(delta.dtype)  # the scale may stay fp32 under bf16/fp16

    def _task_scales(self) -> Tensor:
        if isinstance(self.lora_task_scale, nn.ParameterDict):
            return torch.cat([self.lora_task_scale[t] for t in self.tasks])
        return self.lora_task_scale

    def _stacked_task_weights(self) -> tuple[Tensor, Tensor]:
        """A as (T, r_max, d_in) and B^T as (T, r_max, d_out); unequal ranks are zero-padded, which
        changes neither the result nor the gradients of the real entries."""
        r_max = max(self.task_ranks)
        a = [self.lora_tasks_A[t] for t in self.tasks]
        b = [self.lora_tasks_B[t] for t in self.tasks]
        if min(self.task_ranks) < r_max:
            a = [F.pad(w, (0, 0, 0, r_max - r)) for w, r in zip(a, self.task_ranks)]
            b = [F.pad(w, (0, r_max - r)) for w, r in zip(b, self.task_ranks)]
        return torch.stack(a), torch.stack(b).transpose(1, 2)

    def task_delta(self, x: Tensor) -> Tensor:
        """``s_t * B_t A_t z_t`` for all tasks at once -> (T, *lead, d_out).

        ``x`` is either one shared input (*lead, d_in), used by every task, or per-task inputs
        (T, *lead, d_in).
        """
        num_tasks = len(self.tasks)
        a, b_t = self._stacked_task_weights()  # (T, r, d_in), (T, r, d_out)
        r = a.shape[1]
        if not self.task_input:
            lead = x.shape[:-1]
            h = F.linear(x.reshape(-1, x.shape[-1]), a.reshape(num_tasks * r, -1))  # one GEMM: (N, T*r)
            h = h.view(-1, num_tasks, r).transpose(0, 1)  # (T, N, r)
        else:
            lead = x.shape[1:-1]
            h = torch.bmm(x.reshape(num_tasks, -1, x.shape[-1]), a.transpose(1, 2))  # (T, N, r)
        h = h * self._task_scales().view(num_tasks, 1, 1).to(h.dtype)
        return torch.bmm(h, b_t).view(num_tasks, *lead, -1)  # (T, *lead, d_out)

    def forward(self, x: Tensor) -> Tensor:
        if not self.tasks:
            if self.shared_rank and not self.merged:
                return lora_linear(
                    x,
                    self.weight,
                    self.bias,
                    self.lora_shared_A,
                    self.lora_shared_B,
                    self.lora_shared_scale,
                    self.lora_dropout.p,
                    self.training,
                )
            return F.linear(x, self.weight, self.bias)
        if self.mode == "addition":
            return self._forward_addition(x)

        d_in = x.shape[-1]
        num_streams = self.num_streams
        lead = x.shape[:-1]
        inp = x.reshape(num_streams, -1, d_in) if self.task_input else x.reshape(-1, d_in)
        shared = None
        if self.shared_rank and not self.merged:
            shared = (self.lora_shared_A, self.lora_shared_B, self.lora_shared_scale)
        a, b_t = self._stacked_task_weights()
        out = task_lora_linear(
            inp,
            self.weight,
            self.bias,
            shared,
            a,
            b_t,
            self._task_scales(),
            task_input=self.task_input,
            shared_in_tasks=self.mode == "matrixv2",
            dropout=self.lora_dropout.p,
            training=self.training,
        )  # (1+T, N, d_out)
        if self.task_input:
            return out.view(*lead, -1)  # ((1+T)*B, ..., d_out)
        return out.view(num_streams * lead[0], *lead[1:], -1)

    def _forward_addition(self, x: Tensor) -> Tensor:
        """``addition`` mode: shared = P + LayerNorm(sum_t (P + U_t)), task t = P + U_t."""
        if self.task_input:
            streams = x.unflatten(0, (self.num_streams, -1))  # (1+T, B, ..., d_in)
            x0, task_in = streams[0], streams[1:]
        else:
            x0 = x
            task_in = self.lora_dropout(x)
        frozen = F.linear(x0, self.weight, self.bias)
        tasks = frozen.unsqueeze(0) + self.task_delta(task_in)  # (T, B, ..., d_out)
        shared = frozen + self.lora_norm(tasks.sum(0))
        return torch.cat([shared.unsqueeze(0), tasks]).flatten(0, 1)

    # ----------------------------------------------------------------------------------------------
    @property
    def can_merge(self) -> bool:
        """The shared delta can be folded into W only if every output that uses W also wants it:
        in ``matrix`` mode the task outputs use the bare W, so a layer with task branches cannot."""
        return self.shared_rank > 0 and (not self.tasks or self.mode == "matrixv2")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s_sh * B_sh A_sh`` into the frozen weight (inference)."""
        if self.merged:
            return
        if not self.can_merge:
            raise ValueError(
                f"cannot merge a {self.mode}-mode layer with task branches: its task outputs use the "
                "unmerged frozen weight; leave it unmerged (MTLoRASwin.merge_adapters skips such layers)"
            )
        self.weight += (self.lora_shared_B @ self.lora_shared_A * self.lora_shared_scale).to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        if not self.merged:
            return
        self.weight -= (self.lora_shared_B @ self.lora_shared_A * self.lora_shared_scale).to(self.weight.dtype)
        self.merged = False

    def drop_shared_branch(self) -> int:
        """Remove the shared branch (its output is never used downstream); returns the parameters removed."""
        removed = 0
        for name in ("lora_shared_A", "lora_shared_B", "lora_norm"):
            module_or_param = getattr(self, name, None)
            if module_or_param is None:
                continue
            params = (
                [module_or_param] if isinstance(module_or_param, nn.Parameter) else list(module_or_param.parameters())
            )
            removed += sum(p.numel() for p in params)
            delattr(self, name)
        if isinstance(getattr(self, "lora_shared_scale", None), nn.Parameter):
            removed += 1
        if hasattr(self, "lora_shared_scale"):
            delattr(self, "lora_shared_scale")
        self.shared_rank = 0
        if self.mode == "addition":
            self.mode = "matrix"  # shared output = P, task outputs unchanged
        return removed

    def extra_repr(self) -> str:
        ranks = dict(zip(self.tasks, self.task_ranks))
        return (
            f"{super().extra_repr()}, mode={self.mode}, shared_rank={self.shared_rank}, "
            f"task_ranks={ranks}, task_input={self.task_input}, merged={self.merged}"
        )
