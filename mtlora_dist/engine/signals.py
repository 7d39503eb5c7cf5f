"""Graceful stop on SIGTERM/SIGUSR1/SIGINT: finish the step, write a checkpoint, exit.

SLURM sends USR1 (``--signal=B:USR1@grace``) or TERM before it kills a job; the handler only sets a
flag. Ranks agree on the flag with one host-side all-reduce per step (``comm.any_rank``), so every
rank stops at the same step and the checkpoint collective is entered by all of them.
"""

from __future__ import annotations

import signal

from mtlora_dist import comm

__all__ = ["TerminationFlag"]


class TerminationFlag:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal (a collective: call it on all ranks)."""
        return comm.any_rank(self.received is not None)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "signal on another rank"
