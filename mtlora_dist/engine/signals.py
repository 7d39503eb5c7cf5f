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

A launcher's kill timer cannot always be beaten: a step that takes longer than the grace (a large GPU step,
a paper recipe on a CPU at 30-40 s a step, a slow upload of the checkpoint) is killed before its checkpoint.
So each rank measures its steps (the time between two ``should_stop`` calls); under a launcher with a kill
timer the announcement names the deadline, and says at once when the last step took longer than it. A
watchdog then says, in one line just before the kill, what was not saved: the steps since the newest
complete checkpoint, which a rerun resumes from. The trainer reports each checkpoint with :meth:`saved`.

One stop arrives without a signal: the deepspeed runner has no handler on a single node, so a SIGTERM
sent to it alone (``kill <pid of deepspeed>``) ends the runner and leaves its ranks training, orphaned.
Each rank therefore also watches the launcher processes above it (deepspeed's runner and per-node
launcher, torchrun) and treats one that has gone as a stop request.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

import psutil  # a DeepSpeed dependency

from mtlora_dist import comm
from mtlora_dist.engine.console import write_stderr

__all__ = ["TerminationFlag", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_LAUNCHERS = ("deepspeed.launcher", "bin/deepspeed", "torch.distributed.run", "bin/torchrun")
# The deepspeed launcher (launch.py's terminate_process_tree) and torchrun SIGKILL a rank this long after their
# SIGTERM; the watchdog speaks this much before it.
LAUNCHER_GRACE_S = 30.0
_WARN_BEFORE_S = 3.0


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


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


class TerminationFlag:
    """Installs the stop handlers; ``should_stop()`` is the collective the loop asks once per step.

    ``grace_s``: seconds between a stop signal and the launcher's SIGKILL (``LAUNCHER_GRACE_S`` under the
    deepspeed launcher or torchrun, None without a kill timer); a test may pass a shorter one."""

    def __init__(self, announce: bool = True, grace_s: float | None = None) -> None:
        self.received: int | None = None
        self.launcher_gone = False
        self.announce = announce  # one line on stderr when the first signal arrives (rank 0)
        self.finishing = "finishing this step"  # what the announcement says the rank does before stopping
        self._launchers = launcher_processes()
        self.grace_s = grace_s if grace_s is not None else (LAUNCHER_GRACE_S if self._launchers else None)
        self._last_call: float | None = None  # should_stop's previous call: one step ago
        self.last_step_s: float | None = None
        self.newest: tuple[int, str] | None = None  # the newest checkpoint (step, URL) this job knows of
        self.saved_after_signal = False
        self._watchdog: threading.Timer | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        first = self.received is None
        self.received = self.received or signum
        if not first:
            return
        if self.grace_s is not None:
            self._watchdog = threading.Timer(self.grace_s - self._warn_before(), self._warn_unsaved)
            self._watchdog.daemon = True
            self._watchdog.start()
        if self.announce:
            # os.write: no locks taken inside a signal handler (logging could be mid-write)
            write_stderr(f"\nreceived {signal.Signals(signum).name}: {self.finishing}, then a checkpoint and exit 3"
                         f"{self._deadline()}\n")  # fmt: skip

    def _warn_before(self) -> float:
        return min(_WARN_BEFORE_S, self.grace_s / 4)

    def _deadline(self) -> str:
        if self.grace_s is None:
            return ""
        text = f" (the launcher kills this rank {_seconds(self.grace_s)} after its signal"
        if self.last_step_s is not None and self.last_step_s > self.grace_s:
            text += (
                f"; a step takes {_seconds(self.last_step_s)} here, so this one may not finish in time, and then "
                f"{self._lost()}"
            )
        return text + ")"

    def _lost(self) -> str:
        if self.newest is None:
            return "no checkpoint of this job is kept: a rerun starts from the run's newest checkpoint, if any"
        step, url = self.newest
        return f"a rerun resumes from step {step} ({url})"

    def _warn_unsaved(self) -> None:
        """The watchdog: the launcher's kill is seconds away and the stop's checkpoint is not written."""
        if self.saved_after_signal or not self.announce:
            return
        write_stderr(
            f"stop: no checkpoint written {_seconds(self.grace_s - self._warn_before())} after the signal, and the "
            f"launcher kills this rank in {_seconds(self._warn_before())}: the steps since the newest checkpoint "
            f"are not saved; {self._lost()}\n"
        )

    def saved(self, step: int, url: str, complete: bool = True) -> None:
        """The trainer wrote (``complete``) or started uploading the checkpoint of ``step`` at ``url``."""
        if complete:
            self.newest = (step, url)
        if self.received is not None and complete:
            self.saved_after_signal = True
            if self._watchdog is not None:
                self._watchdog.cancel()

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
        now = time.monotonic()
        if self._last_call is not None:
            self.last_step_s = now - self._last_call
        self._last_call = now
        if self.received is None and not self.launcher_gone:
            self.launcher_gone = any(_gone(p) for p in self._launchers)
        return comm.any_rank(self.received is not None or self.launcher_gone)

    @property
    def name(self) -> str:
        if self.received:
            return signal.Signals(self.received).name
        return "the launcher exited" if self.launcher_gone else "signal on another rank"
