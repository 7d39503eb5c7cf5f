"""Graceful stop on SIGTERM/SIGUSR1/SIGINT: finish the step, write a checkpoint, exit 3.

Every launcher we document delivers a stop differently, and the trainer has to win against each one's
kill timer (the deepspeed launcher and torchrun SIGKILL a rank 30 s after their SIGTERM):

- a terminal's Ctrl-C sends SIGINT to the whole foreground process group: launcher, ranks and their
  DataLoader workers;
- the deepspeed launcher answers SIGINT/SIGTERM by sending SIGTERM to every rank's process tree,
  workers included, one rank at a time; torchrun sends SIGTERM to each rank's process group;
- Slurm sends USR1 or TERM to every process of a step (``slurm/launch.sh`` forwards USR1).

So the handler only sets a flag; ranks agree on it with one host-side all-reduce per step
(``comm.any_rank``), which makes every rank stop at the same step even when only one was signalled,
and enter the checkpoint collective together. DataLoader workers leave the stop to their rank
(``data/stream/worker_signals.py``), so a signal to the process tree no longer kills the workers under the
training step.

One stop arrives without a signal: the deepspeed runner has no handler on a single node, so a SIGTERM
sent to it alone (``kill <pid of deepspeed>``) ends the runner and leaves its ranks training, orphaned.
Each rank therefore also watches the launcher processes above it (deepspeed's runner and per-node
launcher, torchrun) and treats one that has gone as a stop request.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import psutil  # a DeepSpeed dependency

from mtlora_dist import comm
from mtlora_dist.engine.console import write_stderr

__all__ = ["TerminationFlag", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_LAUNCHERS = ("deepspeed.launcher", "bin/deepspeed", "torch.distributed.run", "bin/torchrun")


def launcher_processes() -> list[psutil.Process]:
    """The deepspeed or torchrun processes this rank runs under (none under ``python`` or ``srun``)."""
    found = []
    try:
        proc = psutil.Process().parent()
        while proc is not None and proc.pid > 1:
            if any(name in " ".join(proc.cmdline()) for name in _LAUNCHERS):
                found.append(proc)
            proc = proc.parent()
    except psutil.Error:
        pass
    return found


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


class TerminationFlag:
    """Installs the stop handlers; ``should_stop()`` is the collective the loop asks once per step."""

    def __init__(self, announce: bool = True) -> None:
        self.received: int | None = None
        self.launcher_gone = False
        self.announce = announce  # one line on stderr when the first signal arrives (rank 0)
        self.finishing = "finishing this step"  # what the announcement says the rank does before stopping
        self._launchers = launcher_processes()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        first = self.received is None
        self.received = self.received or signum
        if first and self.announce:
            # os.write: no locks taken inside a signal handler (logging could be mid-write)
            write_stderr(f"\nreceived {signal.Signals(signum).name}: {self.finishing}, then a checkpoint and exit 3\n")

    @contextlib.contextmanager
    def doing(self, what: str) -> Iterator[None]:
        """While inside, a stop announces that the rank is finishing ``what`` (e.g. an evaluation) first."""
        before, self.finishing = self.finishing, f"finishing {what}"
        try:
            yield
        finally:
            self.finishing = before

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal or lost its launcher (a collective: call it on
        all ranks)."""
        if self.received is None and not self.launcher_gone:
            self.launcher_gone = any(_gone(p) for p in self._launchers)
        return comm.any_rank(self.received is not None or self.launcher_gone)

    @property
    def name(self) -> str:
        if self.received:
            return signal.Signals(self.received).name
        return "the launcher exited" if self.launcher_gone else "signal on another rank"
