"""How a distributed entry point ends its process: with the job's exit status, before the interpreter's
teardown (stdlib only, so an entry point can import it before torch)."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import NoReturn

__all__ = ["exit_before_teardown"]


def exit_before_teardown(main: Callable[[], object]) -> NoReturn:
    """Run a training entry point, then end the process with its exit status before the interpreter's
    teardown, which can abort a finished run.

    Why: the process groups outlive ``destroy_process_group``. DeepSpeed's engine and its ZeRO-3 parameters
    (each holds its group) are still alive after ``train`` returns, even after ``gc.collect()``, and gloo's
    threads still run at exit. So the groups are destroyed while the interpreter finalises, which now and
    then aborts ("terminate called without an active exception"; one rank of CI's 2-rank full-FT resume).
    The job's outputs are all written by then, but it exits 134 instead of 0, or 134 instead of the 3 that
    tells SLURM to requeue a preempted job.

    Everything a normal exit does while the interpreter is alive still happens: non-daemon threads are
    joined, the ``atexit`` handlers run (logging, wandb, multiprocessing's children), and stdout and stderr
    are flushed. A bug still prints its traceback and exits 1.
    """
    try:
        main()
        status: object = 0
    except SystemExit as done:
        status = done.code
    except BaseException:  # noqa: BLE001 - a bug: its traceback, then status 1, as Python's own exit gives
        traceback.print_exc()
        status = 1
    if status is None:
        status = 0
    elif not isinstance(status, int):  # sys.exit("message"): printed, status 1 (what Python does)
        print(status, file=sys.stderr)
        status = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status & 0xFF)
