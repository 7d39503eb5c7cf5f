"""Base class of the streaming metrics: additive tensor state, so ranks combine by summing.

A metric keeps only sums and counts (confusion matrices, histograms, per-threshold totals), never
per-image lists. ``all_reduce`` sums that state over ranks, after which ``compute`` gives exactly what
one process would have computed on all the data (up to float64 summation order).
"""

from __future__ import annotations

import copy

from torch import Tensor

from mtlora_dist import comm
from mtlora_dist.tasks.registry import IGNORE_INDEX, TaskSpec

__all__ = ["Metric"]


class Metric:
    """A streaming metric with ``update`` / ``compute`` / ``reset`` / ``all_reduce``.

    Subclasses define ``_zero_state`` (a dict of tensors that add across batches and ranks),
    ``update`` and ``compute``. State moves to the device of the first prediction it sees.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index
        self.reset()

    @classmethod
    def from_spec(cls, spec: TaskSpec, dataset: str) -> Metric:
        """Build the metric for a registry entry; families that need more (class counts) override it."""
        return cls(ignore_index=spec.ignore_index)

    def _zero_state(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def update(self, pred: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.state: dict[str, Tensor] = self._zero_state()

    def _add(self, **increments: Tensor) -> None:
        """Add per-batch increments to the state, moving the state to the increments' device."""
        for key, inc in increments.items():
            current = self.state[key].to(inc.device)
            self.state[key] = current + inc.to(current.dtype)

    def all_reduce(self) -> None:
        """Sum the state over ranks in place; a no-op without an initialised process group.

        Every rank must call it (it is a collective), in the same order across metrics.
        """
        for key in self.state:  # dict order is the same on every rank
            self.state[key] = comm.all_reduce(self.state[key])

    def reduced(self) -> Metric:
        """A copy with the state summed over ranks; this metric keeps its local state, so calling it
        twice never double-counts."""
        other = copy.deepcopy(self)
        other.all_reduce()
        return other
