"""Stop signals in DataLoader workers: the training process decides when to stop, not its workers.

A stop reaches the workers as well as their rank: a terminal's Ctrl-C goes to the whole foreground
process group, the deepspeed launcher sends SIGTERM to every process of each rank's tree, torchrun to
each rank's process group, Slurm to every process of a step. torch's own worker handler dies of any
SIGTERM that its parent did not send, so the rank's next batch raised "DataLoader worker is killed by
signal: Terminated" and the run ended without its checkpoint. Workers therefore ignore SIGINT and
SIGUSR1, and take SIGTERM only from their parent (the rank, shutting its workers down), as torch does;
a SIGTERM from anyone else is swallowed. Python's handlers cannot see the sender, so SIGTERM is
blocked and read with ``sigwaitinfo`` on a small thread.

A rank that dies while taking a batch (its peer killed it, the OOM killer) leaves the worker's
multiprocessing resource-sharer thread, which hands the batch's shared memory over, with a closed
connection; that thread prints a traceback through ``sys.excepthook`` and carries on. The rank's own
exit is already reported in one line by the training process, so workers keep that one quiet.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from types import TracebackType

__all__ = ["shield_worker_from_stop_signals", "quiet_when_the_rank_vanishes"]


def _exit_on_parent_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)  # what torch's worker handler does for its parent's SIGTERM


def _from_resource_sharer(tb: TracebackType | None) -> bool:
    return any(
        frame.f_code.co_name == "_serve" and frame.f_code.co_filename.endswith("resource_sharer.py")
        for frame, _ in traceback.walk_tb(tb)
    )


def quiet_when_the_rank_vanishes() -> None:
    """Drop the resource sharer's traceback for a connection its rank closed by dying; report the rest."""
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(exc_type, (EOFError, ConnectionError)) and _from_resource_sharer(tb):
            return
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def shield_worker_from_stop_signals(_worker_id: int | None = None) -> None:
    """Call first thing in a DataLoader worker (usable as ``worker_init_fn``)."""
    quiet_when_the_rank_vanishes()
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
    threading.Thread(
        target=_exit_on_parent_sigterm, args=(os.getppid(),), daemon=True, name="sigterm-from-parent"
    ).start()
