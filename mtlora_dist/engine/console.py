"""What a run prints: the log format of every rank, and training progress for a person at a terminal
and for a batch log file.

Every entry point sets logging up through :func:`setup_logging`: rank 0 logs at INFO, the others only
warnings, each line prefixed with time and rank.

On a terminal (rank 0, stdout a TTY, ``logging.progress_bar: true``) a tqdm bar shows step, loss, lr
and img/s, and log lines are routed through ``tqdm.write`` so an evaluation table or the stop line is
never glued onto the bar. Anywhere else (``sbatch`` output files, ``| tee``, CI) the bar would print
nothing until the next evaluation, so one plain line is logged per ``log_every`` instead, as timm and
Lightning do: ``step 120/1800 | loss 1.2345 | lr 1.94e-03 | 41.6 img/s | ETA 0:12:34``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ["Progress", "format_eta", "setup_logging"]

log = logging.getLogger("mtlora_dist")


def setup_logging(rank: int) -> None:
    """The console format of every rank; third-party chatter kept to warnings."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s r{rank}] %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("botocore").setLevel(logging.WARNING)  # "Found credentials in environment variables."
    if rank != 0:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


class Progress:
    """One per run; ``enabled`` is false on every rank but 0."""

    def __init__(self, total: int, initial: int, enabled: bool, bar: bool) -> None:
        self.total, self.first_step = total, initial
        self.enabled = enabled
        self.started = time.perf_counter()
        self.bar = (
            tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stdout)
            if enabled and bar and sys.stdout.isatty()
            else None
        )

    @contextlib.contextmanager
    def routing_logs(self) -> Iterator[None]:
        """While the bar is on screen, log records go through ``tqdm.write`` (above the bar)."""
        if self.bar is None:
            yield
            return
        with logging_redirect_tqdm():
            yield

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def eta(self, step: int) -> float:
        done = step - self.first_step
        return (self.total - step) * (time.perf_counter() - self.started) / done if done > 0 else 0.0

    def report(self, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        """The numbers of a log step: on the bar, or as one plain line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{samples_per_s:.1f}")
            return
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | %.1f img/s | ETA %s",
            step,
            self.total,
            loss,
            lr,
            samples_per_s,
            format_eta(self.eta(step)),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
