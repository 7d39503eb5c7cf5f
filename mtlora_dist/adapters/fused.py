"""Frozen linear plus one LoRA branch as a single autograd op: ``y = W x + b + s * B A drop(x)``.

Written by hand because the composed version moves every activation through memory several more
times than the math needs: autograd keeps a dropout mask as large as the input, scales and adds the
low-rank product in separate passes, and in backward adds the LoRA input-gradient to the frozen one
in yet another pass. Here the low-rank product is accumulated into the frozen output by one
``addmm_``, the input gradient of both paths is one ``addmm``, the dropout mask is a
:class:`~mtlora_dist.adapters.dropout.DropMask` whose 1/(1-p) scale rides on the rank-r side, and
only ``x`` with dropout's zeros and the rank-r activation are saved (the mask itself is a seed on
the context, redrawn in backward, so checkpointing frees all the op holds). Frozen weights get no
gradient; every trainable tensor (A, B, a trainable scale, and W or b if a user unfreezes them) gets
the exact one (``tests/adapters/test_fused.py`` gradchecks every combination).

Under ``torch.autocast`` (any device type) the ops behave like ``torch.amp.custom_fwd(cast_inputs=)``
with ``custom_bwd``: the floating inputs are cast to the autocast dtype, and forward and backward run
in that dtype with autocast off (the in-place and ``out=`` GEMMs need one dtype); gradients come back
in each input's own dtype (fp32 for fp32 parameters). Outside autocast nothing is cast
(``tests/adapters/test_autocast.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mtlora_dist.adapters.dropout import DropMask

__all__ = ["lora_linear", "task_lora_linear"]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs lower-precision ops in on ``device_type`` now, or None when it is off."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(value, device_type: str, dtype: torch.dtype):
    """Autocast's rule: floating tensors on ``device_type`` except float64 go to ``dtype``."""
    if (
        isinstance(value, Tensor)
        and value.is_floating_point()
        and value.device.type == device_type
        and value.dtype is not torch.float64
    ):
        return value.to(dtype)
    return value


def _no_autocast(device_type: str):
    """Autocast off on ``device_type`` (a no-op context when it already is)."""
    if _autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _amp_forward(ctx, body: Callable, args: Sequence, device_type: str):
    """Run ``body(ctx, *args)``; under autocast with its floating tensors cast and autocast off.

    Records on ``ctx`` what :func:`_amp_backward` needs to run backward the same way.
    """
    dtype = _autocast_dtype(device_type)
    ctx.amp_device, ctx.amp_dtype = device_type, dtype
    if dtype is None:
        return body(ctx, *args)
    ctx.input_dtypes = [a.dtype if isinstance(a, Tensor) else None for a in args]
    with torch.autocast(device_type, enabled=False):
        return body(ctx, *(_cast(a, device_type, dtype) for a in args))


def _amp_backward(ctx, body: Callable, grad_out: Tensor) -> tuple:
    """Run ``body(ctx, grad_out)`` with autocast off; after an autocast forward, in its dtype, with each
    gradient cast back to its input's dtype."""
    if ctx.amp_dtype is None:
        with _no_autocast(ctx.amp_device):
            return body(ctx, grad_out)
    with torch.autocast(ctx.amp_device, enabled=False):
        grads = body(ctx, grad_out.to(ctx.amp_dtype))
    return tuple(g if g is None or dt is None else g.to(dt) for g, dt in zip(grads, ctx.input_dtypes))


class _LoRALinear(torch.autograd.Function):
    """:func:`_lora_forward` / :func:`_lora_backward` under the autocast rules of :func:`_amp_forward`.

    ``forward``/``backward`` are static methods naming their bodies directly (no classmethod, no
    ``cls._forward`` lookup), the form dynamo traces into one graph without a break.
    """

    @staticmethod
    def forward(ctx, *args):  # type: ignore[override]
        return _amp_forward(ctx, _lora_forward, args, args[0].device.type)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        return _amp_backward(ctx, _lora_backward, grad_out)


def _lora_forward(ctx, x, weight, bias, lora_a, lora_b, scale, mask):
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d_in)  # (N, d_in)
    out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()  # (N, d_out)
    # dropout's zeros go into a copy of x; its 1/(1-p) goes into the rank-r side
    x_kept = mask.zero_dropped_(x2.clone()) if mask is not None else x2
    keep_scale = mask.scale if mask is not None else 1.0
    h = x_kept @ lora_a.t()  # (N, r) = A drop(x) / keep_scale
    s = scale.to(h.dtype) * keep_scale
    out.addmm_(h * s, lora_b.t())
    ctx.mask, ctx.keep_scale, ctx.scale_dtype, ctx.has_bias = mask, keep_scale, scale.dtype, bias is not None
    ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, x_kept, h, weight, lora_a, lora_b, s)
    return out.view(*lead, out.shape[-1])


def _lora_backward(ctx, grad_out):
    x2, x_kept, h, weight, lora_a, lora_b, s = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_lb, need_s, _ = ctx.needs_input_grad
    dy = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
    g = dy @ lora_b  # (N, r): gradient w.r.t. the rank-r product that B multiplies
    dh = g * s  # gradient w.r.t. h (x_kept A^T), keep scale included
    grad_x = grad_w = grad_bias = grad_a = grad_lb = grad_s = None
    if need_x:
        lora_dx = dh @ lora_a  # (N, d_in), a fresh tensor: the mask zeroes it in place
        if ctx.mask is not None:
            lora_dx = ctx.mask.zero_dropped_(lora_dx)
        grad_x = torch.addmm(lora_dx, dy, weight).view(*grad_out.shape[:-1], weight.shape[1])
    if need_w:
        grad_w = dy.t() @ x2
    if need_b and ctx.has_bias:
        grad_bias = dy.sum(0)
    if need_a:
        grad_a = dh.t() @ x_kept
    if need_lb:
        grad_lb = dy.t() @ (h * s)
    if need_s:
        grad_s = ((g * h).sum() * ctx.keep_scale).reshape(1).to(ctx.scale_dtype)
    return grad_x, grad_w, grad_bias, grad_a, grad_lb, grad_s, None


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    dropout: float = 0.0,
    training: bool = True,
    mask: DropMask | None = None,
) -> Tensor:
    """``x W^T + b + scale * drop(x) A^T B^T`` over the last axis of ``x``.

    ``scale`` is a 1-element tensor (a buffer, or a parameter when the scale trains); ``mask`` reuses
    a dropout draw, otherwise one is drawn when ``training`` and ``dropout > 0``.
    """
    if mask is None and training and dropout > 0.0:
        mask = DropMask((x.numel() // x.shape[-1], x.shape[-1]), dropout, x.device)
    return _LoRALinear.apply(x, weight, bias, lora_a, lora_b, scale, mask)


class _TaskLoRALinear(torch.autograd.Function):
    """An MTLoRA layer with task branches (``matrix``/``matrixv2``) -> all 1+T streams at once.

    The streams are written into one (1+T, N, d_out) buffer, P first: no concatenation in forward and
    no split-and-concatenate of gradients in backward, which on a CPU is several full passes over
    the largest activations of the network. Bodies: :func:`_task_forward` / :func:`_task_backward`.
    """

    @staticmethod
    def forward(ctx, *args):  # type: ignore[override]
        return _amp_forward(ctx, _task_forward, args, args[0].device.type)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        return _amp_backward(ctx, _task_backward, grad_out)


def _task_forward(ctx, x, weight, bias, shared_a, shared_b, shared_scale, task_a, task_bt, task_scale, mask,
                  task_input, shared_in_tasks):  # fmt: skip
    # x: (1+T, N, d_in) stacked streams when task_input, else the shared input (N, d_in)
    num_tasks, rank, d_in = task_a.shape
    x0, z = (x[0], x[1:]) if task_input else (x, None)
    n = x0.shape[0]
    out = x0.new_empty(1 + num_tasks, n, weight.shape[0])
    if bias is not None:
        torch.addmm(bias, x0, weight.t(), out=out[0])  # P
    else:
        torch.mm(x0, weight.t(), out=out[0])
    # dropout's zeros go into a copy of x0, its 1/(1-p) into the scales of the branches reading x0
    x0_kept = mask.zero_dropped_(x0.clone()) if mask is not None else x0
    keep_scale = mask.scale if mask is not None else 1.0
    task_keep = 1.0 if task_input else keep_scale
    s_t = task_scale.to(x0.dtype).view(num_tasks, 1, 1) * task_keep
    if task_input:
        h_t = torch.bmm(z, task_a.transpose(1, 2))  # (T, N, r)
    else:  # one GEMM for all task A matrices
        h_t = (x0_kept @ task_a.reshape(num_tasks * rank, d_in).t()).view(n, num_tasks, rank).transpose(0, 1)
    h_sh = s_sh = None
    if shared_a is not None:
        h_sh = x0_kept @ shared_a.t()  # (N, r_sh)
        s_sh = shared_scale.to(h_sh.dtype) * keep_scale
    if h_sh is not None and shared_in_tasks:  # matrixv2: the tasks' base includes the shared delta
        out[0].addmm_(h_sh * s_sh, shared_b.t())
    torch.baddbmm(out[0].expand(num_tasks, *out.shape[1:]), h_t * s_t, task_bt, out=out[1:])
    if h_sh is not None and not shared_in_tasks:
        out[0].addmm_(h_sh * s_sh, shared_b.t())
    ctx.mask, ctx.task_input, ctx.shared_in_tasks = mask, task_input, shared_in_tasks
    ctx.scale_dtypes = (None if shared_scale is None else shared_scale.dtype, task_scale.dtype)
    ctx.keep_scales = (keep_scale, task_keep)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(
        x0 if ctx.needs_input_grad[1] else None,
        x0_kept,
        z,
        h_sh,
        h_t,
        weight,
        shared_a,
        shared_b,
        s_sh,
        task_a,
        task_bt,
        s_t,
    )
    return out


def _task_backward(ctx, grad_out):
    x0, x0_kept, z, h_sh, h_t, weight, shared_a, shared_b, s_sh, task_a, task_bt, s_t = ctx.saved_tensors
    need = ctx.needs_input_grad
    num_tasks, rank, d_in = task_a.shape
    n = x0_kept.shape[0]
    grad_out = grad_out.contiguous()
    d0, d_tasks = grad_out[0], grad_out[1:]
    d_frozen = grad_out.sum(0)  # P feeds every stream
    grads: list = [None] * 12

    g_t = torch.bmm(d_tasks, task_bt.transpose(1, 2))  # (T, N, r): gradient w.r.t. s_t * h_t
    dh_t = g_t * s_t
    if need[7]:
        grads[7] = torch.bmm((h_t * s_t).transpose(1, 2), d_tasks)
    if need[8]:
        grads[8] = ((g_t * h_t).sum((1, 2)) * ctx.keep_scales[1]).to(ctx.scale_dtypes[1])
    dh_t_flat = None if ctx.task_input else dh_t.transpose(0, 1).reshape(n, num_tasks * rank)
    if need[6]:
        grads[6] = (
            torch.bmm(dh_t.transpose(1, 2), z)
            if ctx.task_input
            else (dh_t_flat.t() @ x0_kept).view(num_tasks, rank, d_in)
        )

    lora_rows, lora_cols = [], []  # low-rank gradients that reach x0 through drop(x0), keep scale included
    if h_sh is not None:
        d_shared = d_frozen if ctx.shared_in_tasks else d0
        g_sh = d_shared @ shared_b
        dh_sh = g_sh * s_sh
        if need[3]:
            grads[3] = dh_sh.t() @ x0_kept
        if need[4]:
            grads[4] = d_shared.t() @ (h_sh * s_sh)
        if need[5]:
            grads[5] = ((g_sh * h_sh).sum() * ctx.keep_scales[0]).reshape(1).to(ctx.scale_dtypes[0])
        lora_rows.append(dh_sh)
        lora_cols.append(shared_a)
    if dh_t_flat is not None:
        lora_rows.append(dh_t_flat)
        lora_cols.append(task_a.reshape(num_tasks * rank, d_in))

    if need[0]:
        lora_dx = None
        if lora_rows:  # one GEMM over the shared and (shared-input) task ranks
            lora_dx = torch.cat(lora_rows, 1) @ torch.cat(lora_cols, 0)
            if ctx.mask is not None:
                lora_dx = ctx.mask.zero_dropped_(lora_dx)
        if ctx.task_input:
            grad_x = grad_out.new_empty(1 + num_tasks, n, d_in)
            if lora_dx is None:
                torch.mm(d_frozen, weight, out=grad_x[0])
            else:
                torch.addmm(lora_dx, d_frozen, weight, out=grad_x[0])
            torch.bmm(dh_t, task_a, out=grad_x[1:])
        else:
            grad_x = d_frozen @ weight if lora_dx is None else torch.addmm(lora_dx, d_frozen, weight)
        grads[0] = grad_x
    if need[1]:
        grads[1] = d_frozen.t() @ x0
    if need[2] and ctx.has_bias:
        grads[2] = d_frozen.sum(0)
    return tuple(grads)


def task_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    shared: tuple[Tensor, Tensor, Tensor] | None,
    task_a: Tensor,
    task_bt: Tensor,
    task_scale: Tensor,
    *,
    task_input: bool,
    shared_in_tasks: bool,
    dropout: float = 0.0,
    training: bool = True,
    mask: DropMask | None = None,
) -> Tensor:
    """All streams of an MTLoRA layer with task branches, as (1+T, N, d_out).

    ``x`` is (1+T, N, d_in) when ``task_input`` (stream 0 shared, then one stream per task), else
    the shared input (N, d_in) that every task branch also reads. ``shared`` is the shared branch
    ``(A, B, scale)`` or None; ``task_a`` is (T, r, d_in), ``task_bt`` (T, r, d_out) and
    ``task_scale`` (T,). Stream 0 is ``P + s_sh B_sh A_sh drop(x0)``; task t is
    ``base + s_t B_t A_t z_t`` with ``base = P``, or the shared stream when ``shared_in_tasks``
    (``matrixv2``). Dropout hits the shared input only, and task branches that read it share its mask.
    """
    x0 = x[0] if task_input else x
    if mask is None and training and dropout > 0.0:
        mask = DropMask(x0.shape, dropout, x.device)
    shared_a, shared_b, shared_scale = shared if shared is not None else (None, None, None)
    return _TaskLoRALinear.apply(x, weight, bias, shared_a, shared_b, shared_scale, task_a, task_bt, task_scale, mask,
                                 task_input, shared_in_tasks)  # fmt: skip
