"""LoRA dropout that is cheap to draw on a CPU.

``torch.nn.Dropout`` draws one random number per element; on a CPU that costs ~6 ns an element
(``bernoulli_``), about 120 ms per Swin-T step at 224 px, batch 2: a tenth of the whole step. With
the small rates LoRA uses (0.05) almost every draw says "keep". :class:`DropMask` instead draws the
*gaps* between dropped elements, which for i.i.d. Bernoulli(p) elements are i.i.d. Geometric(p):
``ceil(log(1 - u) / log(1 - p))`` for uniform ``u``. That is the same distribution as
``nn.Dropout`` (exactly, up to float64 rounding of ``u``) from ``p * numel`` draws instead of
``numel``, about 10x faster at p = 0.05. On other devices a plain keep-mask is drawn in one kernel.

A mask is applied twice, to the input in forward and to its gradient in backward. It is not kept
between the two: a :class:`DropMask` holds only a seed (drawn from the default CPU generator, so
``torch.manual_seed`` and checkpointing's ``preserve_rng_state`` replay it) and redraws the same
elements from a generator of its own each time it is applied. A kept mask would be a Python
attribute of the autograd context, which gradient checkpointing cannot free (positions take 0.4 bytes
an element at p = 0.05, a keep-mask 1 byte; issue 13 puts it at ~29 % of Swin-B's activation memory
with checkpointing on). Redrawing costs one more draw per layer and step, in backward (~2 ms for a
(6272, 384) input as positions on the 2-core CPU machine).

Under ``torch.compile`` both samplers break the graph: the seed is a Python int (a ``.item()``), the
positions sampler loops on a data-dependent count, and a ``torch.Generator`` made in forward is an
opaque object dynamo cannot put in a graph. Compiled code (``torch.compiler.is_compiling()``) therefore
uses a third sampler, *hashed*: the seed is a 2-element int64 tensor drawn with ``torch.randint`` from
the default generator (in the graph; ``torch.manual_seed`` replays it), and element ``i`` is dropped
when a 32-bit integer hash of ``(i, seed)`` falls below ``p * 2**32``. The mask is a pure function of
the seed tensor and element indices, so the compiler can fuse it into the op that applies it and
recompute it in backward: AOTAutograd's min-cut partitioner (inductor's) saves only the seed for
backward (``tests/models/test_compile.py``), so no mask outlives forward, as in eager code. Eager and
compiled runs of the hashed sampler drop the same elements
(:func:`hashed_masks` turns it on in eager code, for such comparisons). Each element is Bernoulli(p) up
to the hash's quality and a 2**-32 rounding of ``p`` (``tests/adapters/test_dropout.py`` checks rate
and independence of neighbours); in eager code it costs ~12 passes over an int64 tensor, which is why
eager keeps the other two samplers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["DropMask", "LoRADropout", "hashed_masks", "lora_dropout"]

# Gap draws per batch: the expected count plus six standard deviations; a shortfall draws again.
_SIGMAS = 6.0


def _dropped_positions(numel: int, p: float, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Sorted flat indices of the elements an i.i.d. Bernoulli(p) dropout zeroes."""
    log_keep = math.log1p(-p)
    chunks, last = [], -1  # last: index of the last dropped element drawn so far
    while last < numel:
        remaining = numel - 1 - last
        mean = remaining * p
        count = int(mean + _SIGMAS * math.sqrt(mean * (1.0 - p)) + 16)
        u = torch.rand(count, dtype=torch.float64, device=device, generator=generator)
        gaps = torch.log1p(-u).div_(log_keep).ceil_().clamp_min_(1).long()  # Geometric(p) on {1, 2, ...}
        positions = gaps.cumsum_(0).add_(last)
        chunks.append(positions)
        last = int(positions[-1])
    positions = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return positions[: int(torch.searchsorted(positions, numel))]


def _draw_seed() -> int:
    """A seed for one mask, from the default CPU generator (no device sync, replayed by its state)."""
    return int(torch.randint(2**63 - 1, (), dtype=torch.int64))


_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # below 2**31: a product with a 32-bit value stays inside int64, no overflow
_FORCE_HASHED = False


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of int64 values in [0, 2**32), in torch ops."""
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL) & _M32
    return x ^ (x >> 16)


def _hashed_keep(shape: torch.Size, p: float, seed: Tensor) -> Tensor:
    """Bool keep-mask of ``shape``: element i is dropped when hash(i, seed) < p * 2**32."""
    numel = shape.numel()
    if numel >= 2**32:
        raise ValueError(f"hashed dropout indexes elements with 32 bits; a tensor of {numel} elements is too large")
    index = torch.arange(numel, dtype=torch.int64, device=seed.device)
    bits = _mix32(_mix32((index + seed[0]) & _M32) ^ seed[1])
    return (bits >= round(p * 2**32)).view(shape)


def _use_hashed() -> bool:
    return _FORCE_HASHED or torch.compiler.is_compiling()


@contextlib.contextmanager
def hashed_masks() -> Iterator[None]:
    """Draw masks with the compile-friendly hashed sampler in eager code too, so an eager run drops
    the same elements as a compiled one under the same ``torch.manual_seed`` (tests, comparisons)."""
    global _FORCE_HASHED
    previous, _FORCE_HASHED = _FORCE_HASHED, True
    try:
        yield
    finally:
        _FORCE_HASHED = previous


class DropMask:
    """One dropout draw for a tensor of ``shape``: which elements are zeroed, and the 1/(1-p) scale.

    Holds no mask tensor: the draw is a seed, and :attr:`positions` / :attr:`keep` are drawn again from
    it on each use (the same elements every time), so an autograd context that keeps the mask keeps a
    few integers (a 2-element seed tensor with the hashed sampler), not a tensor that gradient
    checkpointing could not free.
    """

    def __init__(
        self,
        shape: Sequence[int],
        p: float,
        device: torch.device | str = "cpu",
        positions: bool | None = None,
        seed: int | Tensor | None = None,
    ) -> None:
        """``positions``: draw dropped positions (default on a CPU) or a dense keep-mask (default on
        accelerators, where one fused kernel draws it); ignored, in favour of the hashed sampler, under
        ``torch.compile`` and :func:`hashed_masks`. ``seed``: the draw (an int, or a 2-element int64
        tensor for the hashed sampler), else one from the default generator."""
        if not 0.0 < p < 1.0:
            raise ValueError(f"dropout rate must be in (0, 1), got {p}")
        self.shape = torch.Size(shape)
        self.p = float(p)
        self.scale = 1.0 / (1.0 - p)
        self.device = torch.device(device)
        self.hashed = _use_hashed() or isinstance(seed, Tensor)
        if self.hashed:
            self.use_positions = False
            self.seed = torch.randint(2**32, (2,), dtype=torch.int64, device=self.device) if seed is None else seed
            return
        self.use_positions = self.device.type == "cpu" if positions is None else bool(positions)
        self.seed = _draw_seed() if seed is None else int(seed)

    def _generator(self) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.seed)

    @property
    def positions(self) -> Tensor | None:
        """Sorted flat indices of the dropped elements (position sampling), drawn anew from the seed."""
        if not self.use_positions:
            return None
        return _dropped_positions(self.shape.numel(), self.p, self.device, self._generator())

    @property
    def keep(self) -> Tensor | None:
        """Bool keep-mask of ``shape`` (dense sampling), drawn anew from the seed."""
        if self.use_positions:
            return None
        if self.hashed:
            return _hashed_keep(self.shape, self.p, self.seed)
        return torch.rand(self.shape, device=self.device, generator=self._generator()) >= self.p

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
        if not self.use_positions:
            return x.mul_(self.keep)
        x = x.contiguous()
        x.view(-1).index_fill_(0, self.positions, 0)
        return x

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The mask as a tensor of 0 and 1/(1-p) (for tests and reference implementations)."""
        return self.apply(torch.ones(self.shape, dtype=dtype, device=self.device))


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
