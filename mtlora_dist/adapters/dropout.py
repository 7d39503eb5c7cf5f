"""LoRA dropout that is cheap to draw on a CPU.

``torch.nn.Dropout`` draws one random number per element; on a CPU that costs ~6 ns an element
(``bernoulli_``), about 120 ms per Swin-T step at 224 px, batch 2: a tenth of the whole step. With
the small rates LoRA uses (0.05) almost every draw says "keep". :class:`DropMask` instead draws the
*gaps* between dropped elements, which for i.i.d. Bernoulli(p) elements are i.i.d. Geometric(p):
``ceil(log(1 - u) / log(1 - p))`` for uniform ``u``. That is the same distribution as
``nn.Dropout`` (exactly, up to float64 rounding of ``u``) from ``p * numel`` draws instead of
``numel``, about 10x faster at p = 0.05. On other devices a plain keep-mask is drawn in one kernel.

A mask is drawn once per forward and applied twice, to the input and to its gradient, so it is
kept by the autograd function that uses it (positions take 0.4 bytes an element at p = 0.05).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["DropMask", "LoRADropout", "lora_dropout"]

# Gap draws per batch: the expected count plus six standard deviations; a shortfall draws again.
_SIGMAS = 6.0


def _dropped_positions(numel: int, p: float, device: torch.device) -> Tensor:
    """Sorted flat indices of the elements an i.i.d. Bernoulli(p) dropout zeroes."""
    log_keep = math.log1p(-p)
    chunks, last = [], -1  # last: index of the last dropped element drawn so far
    while last < numel:
        remaining = numel - 1 - last
        mean = remaining * p
        count = int(mean + _SIGMAS * math.sqrt(mean * (1.0 - p)) + 16)
        u = torch.rand(count, dtype=torch.float64, device=device)
        gaps = torch.log1p(-u).div_(log_keep).ceil_().clamp_min_(1).long()  # Geometric(p) on {1, 2, ...}
        positions = gaps.cumsum_(0).add_(last)
        chunks.append(positions)
        last = int(positions[-1])
    positions = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return positions[: int(torch.searchsorted(positions, numel))]


class DropMask:
    """One dropout draw for a tensor of ``shape``: which elements are zeroed, and the 1/(1-p) scale."""

    def __init__(self, shape: Sequence[int], p: float, device: torch.device | str = "cpu",
                 positions: bool | None = None) -> None:
        """``positions``: draw dropped positions (default on a CPU) or a dense keep-mask (default on
        accelerators, where one fused kernel draws it)."""
        if not 0.0 < p < 1.0:
            raise ValueError(f"dropout rate must be in (0, 1), got {p}")
        self.shape = torch.Size(shape)
        self.scale = 1.0 / (1.0 - p)
        device = torch.device(device)
        if positions is None:
            positions = device.type == "cpu"
        self.positions: Tensor | None = _dropped_positions(self.shape.numel(), p, device) if positions else None
        self.keep: Tensor | None = None if positions else torch.rand(self.shape, device=device) >= p

    def apply(self, x: Tensor) -> Tensor:
        """A new tensor: ``x`` scaled by 1/(1-p), with the dropped elements set to zero."""
        return self.zero_dropped_(x.mul(self.scale))

    def zero_dropped_(self, x: Tensor) -> Tensor:
        """Set the dropped elements of ``x`` to zero in place, without the 1/(1-p) scale.

        Callers that fold the scale into a smaller tensor (the rank-r side of a LoRA product) use this
        on a fresh tensor and save a full pass over it. Returns ``x`` (made contiguous if it was not).
        """
        if x.shape != self.shape:
            raise ValueError(f"dropout mask drawn for shape {tuple(self.shape)} applied to {tuple(x.shape)}")
        if self.keep is not None:
            return x.mul_(self.keep)
        x = x.contiguous()
        x.view(-1).index_fill_(0, self.positions, 0)
        return x

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The mask as a tensor of 0 and 1/(1-p) (for tests and reference implementations)."""
        device = self.positions.device if self.keep is None else self.keep.device
        return self.apply(torch.ones(self.shape, dtype=dtype, device=device))


class _MaskedScale(torch.autograd.Function):
    """``mask.apply`` as an autograd op whose backward applies the same mask to the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: DropMask) -> Tensor:  # type: ignore[override]
        ctx.mask = mask
        return mask.apply(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return ctx.mask.apply(grad), None


def lora_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Dropout with one :class:`DropMask` draw, applied to ``x`` and to its gradient."""
    if not training or p == 0.0:
        return x
    return _MaskedScale.apply(x, DropMask(x.shape, p, x.device))


class LoRADropout(nn.Module):
    """Drop-in for ``nn.Dropout`` on LoRA inputs (an identity when ``p`` is 0)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"adapter.dropout must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return lora_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
