"""Stop signals in DataLoader workers: the training process decides when to stop, not its workers.

A stop reaches the workers as well as their rank: a terminal's Ctrl-C goes to the whole foreground
process group, the deepspeed launcher sends SIGTERM to every process of each rank's tree, torchrun to
each rank's process group, Slurm to every process of a step. torch's own worker handler dies of any
SIGTERM that its parent did not send, so the rank's next batch raised "DataLoader worker is killed by
signal: Terminated" and the run ended without its checkpoint. Workers therefore ignore SIGINT and
SIGUSR1, and take SIGTERM only from their parent (the rank, shutting its workers down), as torch does;
a SIGTERM from anyone else is swallowed. Python's handlers cannot see the sender, so SIGTERM is
blocked and read with ``sigwaitinfo`` on a small thread.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["shield_worker_from_stop_signals"]


def _exit_on_parent_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)  # what torch's worker handler does for its parent's SIGTERM


def shield_worker_from_stop_signals(_worker_id: int | None = None) -> None:
    """Call first thing in a DataLoader worker (usable as ``worker_init_fn``)."""
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
    threading.Thread(
        target=_exit_on_parent_sigterm, args=(os.getppid(),), daemon=True, name="sigterm-from-parent"
    ).start()
