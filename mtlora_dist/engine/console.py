"""What a run prints: the log format of every rank, and training progress for a person at a terminal
and for a batch log file.

Every entry point sets logging up through :func:`setup_logging`: rank 0 logs at INFO, the others only
warnings, each line prefixed with time and rank. Progress and results go to stdout, warnings and errors
to stderr, as command-line tools do (``python launch/train.py | tee out.log`` keeps the progress).

Output that outlives its reader: with ``2>&1 | tee log``, a terminal's Ctrl-C reaches ``tee`` too, which
dies at once while the trainer finishes its step and writes its checkpoint. A write to the closed pipe
would then raise ``BrokenPipeError`` in the middle of the stop and lose the checkpoint, so
:func:`survive_closed_output` makes stdout and stderr move to the file ``tee`` was writing (found
through ``/proc`` at start-up; ``/dev/null`` where there is none) instead of failing.

On a terminal (rank 0, stdout a TTY, ``logging.progress_bar: true``) a tqdm bar shows step, loss, lr
and img/s, and log lines are routed through ``tqdm.write`` so an evaluation table or the stop line is
never glued onto the bar. Anywhere else (``sbatch`` output files, ``| tee``, CI) the bar would print
nothing until the next evaluation, so one plain line is logged per ``log_every`` instead, as timm and
Lightning do: ``step 120/1800 | loss 1.2345 | lr 1.94e-03 | 41.6 img/s | ETA 0:12:34``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator

import psutil
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mtlora_dist.storage.fs import redact_userinfo

__all__ = [
    "Progress",
    "format_eta",
    "setup_logging",
    "survive_closed_output",
    "write_stderr",
    "cpu_cost",
    "format_duration",
]

log = logging.getLogger("mtlora_dist")


class _Redacting(logging.Formatter):
    """Every log line with the user-info of URLs masked (``s3://***@bucket``): no credential in a log."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_userinfo(super().format(record))


def setup_logging(rank: int) -> None:
    """The console format of every rank: INFO and below on stdout, warnings and errors on stderr;
    third-party chatter kept to warnings. Output survives a pipe reader that dies first."""
    survive_closed_output()
    level = logging.INFO if rank == 0 else logging.WARNING
    formatter = _Redacting(f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S")
    to_stdout = logging.StreamHandler(sys.stdout)
    to_stdout.addFilter(lambda record: record.levelno < logging.WARNING)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    root = logging.getLogger()
    for handler in list(root.handlers):  # set up once: a second call replaces, never duplicates
        if getattr(handler, "mtlora_console", False):
            root.removeHandler(handler)
    for handler in (to_stdout, to_stderr):
        handler.setFormatter(formatter)
        handler.mtlora_console = True
        root.addHandler(handler)
    root.setLevel(level)
    # asyncio's "socket.send() raised exception." repeats once a peer (wandb's service) has gone
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    logging.getLogger("botocore").setLevel(logging.WARNING)  # "Found credentials in environment variables."
    if rank != 0:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


# -- output whose reader has gone ----------------------------------------------------------------------------
def _fd_flags(pid: str, fd: str) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
        return next(int(line.split()[1], 8) for line in fh if line.startswith("flags:"))


def _tee_log_file(fd: int) -> str | None:
    """The file that a ``tee`` reading the pipe on ``fd`` writes (its first file argument), or None: no
    pipe, no /proc, or another kind of reader (``| less`` has no file to continue)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    if not stat.S_ISFIFO(st.st_mode) or not os.path.isdir("/proc"):
        return None
    pipe = f"pipe:[{st.st_ino}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as fh:
                if fh.read().strip() != "tee":
                    continue
            fds = {n: os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
            if fds.get("0") != pipe:
                continue
            files = [
                target
                for n, target in sorted(fds.items(), key=lambda kv: int(kv[0]))
                if int(n) > 2 and target.startswith("/") and _fd_flags(pid, n) & os.O_ACCMODE != os.O_RDONLY
            ]
            return next((f for f in files if os.path.isfile(f)), None)
        except (OSError, ValueError, StopIteration):
            continue
    return None


_fallback: dict[int, str] = {}  # fd -> where its output continues once the pipe's reader has gone


def _redirect_after_broken_pipe(fd: int) -> None:
    """Point ``fd`` (and the other standard stream on the same pipe) at the fallback file."""
    broken = [other for other in (1, 2) if other == fd or _same_file(other, fd)]  # before any dup2
    target = os.open(_fallback.get(fd, os.devnull), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for other in broken:
            os.dup2(target, other)
    finally:
        os.close(target)


def _same_file(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class _SurvivingStream:
    """A text stream that, when its pipe's reader has gone, moves to the fallback and writes again."""

    def __init__(self, stream, fd: int) -> None:
        self._stream, self._fd = stream, fd

    def _retry(self, call, *args):
        try:
            return call(*args)
        except OSError as err:
            if err.errno != errno.EPIPE:
                raise
            _redirect_after_broken_pipe(self._fd)
            return call(*args)

    def write(self, text: str) -> int:
        return self._retry(self._stream.write, text)

    def flush(self) -> None:
        self._retry(self._stream.flush)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def survive_closed_output() -> None:
    """Make stdout and stderr outlive a pipe reader (``| tee log``) that a Ctrl-C ended first. Idempotent."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, _SurvivingStream):
            continue
        found = _tee_log_file(fd)
        if found:
            _fallback[fd] = found
        setattr(sys, name, _SurvivingStream(stream, fd))


def write_stderr(text: str) -> None:
    """``os.write`` to stderr, for signal handlers (no locks); survives a closed pipe like the streams."""
    data = text.encode()
    try:
        os.write(2, data)
    except BrokenPipeError:
        _redirect_after_broken_pipe(2)
        with contextlib.suppress(OSError):
            os.write(2, data)


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


def format_duration(seconds: float) -> str:
    """``'3.1 days'``, ``'5.2 h'``, ``'12 min'`` or ``'40 s'``: a length a person reads at a glance."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


# -- what a run will cost on a CPU -------------------------------------------------------------------------------
# Measured (issue 33): configs/pascal_swin_t_r64.yaml data=synthetic on a 2-core CPU, Swin-T at 448x448, batch 8:
# 14.6 GB of memory and 30-40 s an optimizer step (7,200 steps: an ETA of 3 days). Other runs are scaled from it
# by the pixels and the batch, time by the backbone's FLOPs (embed_dim^2 x blocks: Swin's within 5 %) and memory by
# its activations (embed_dim x blocks).
_REFERENCE = {"gb": 14.6, "step_s": 35.0, "pixels": 448 * 448 * 8, "embed": 96, "blocks": 12}
_SWIN = {"tiny": (96, 12), "small": (96, 24), "base": (128, 24), "large": (192, 24)}  # embed_dim, blocks
_TRAIN_IMAGES = {"pascal_context": 4998, "nyud": 795}


def cpu_cost(cfg) -> str | None:
    """One line saying what training ``cfg`` costs on a CPU, when that is more than minutes a step or
    gigabytes (a paper recipe): memory and time per step scaled from a measured run, the whole run's time
    where it is known. None for runs a CPU does in reasonable time (the quickstart)."""
    model, data = cfg.model, cfg.data
    size = next((v for k, v in _SWIN.items() if f"swin_{k}" in model.backbone), _SWIN["tiny"])
    embed = model.backbone_kwargs.get("embed_dim", size[0])
    blocks = sum(model.backbone_kwargs["depths"]) if "depths" in model.backbone_kwargs else size[1]
    accumulation = cfg.deepspeed.gradient_accumulation_steps
    ref = _REFERENCE
    pixels = model.img_size[0] * model.img_size[1] * data.batch_size / ref["pixels"]
    width, depth = embed / ref["embed"], blocks / ref["blocks"]
    gb, step_s = ref["gb"] * pixels * width * depth, ref["step_s"] * pixels * width**2 * depth * accumulation
    if gb < 4 and step_s < 10:
        return None
    steps = cfg.max_steps
    images = data.synthetic.num_train if data.synthetic.enabled and not data.train_url else None
    images = images or _TRAIN_IMAGES.get(data.dataset)
    if not steps and images:
        steps = cfg.epochs * max(1, images // (data.batch_size * accumulation))
    total = f"; {steps} steps: about {format_duration(steps * step_s)} on one CPU rank" if steps else ""
    free = psutil.virtual_memory().available / 2**30
    short = f" (this machine has {free:.1f} GB free: it may be killed for memory)" if gb > free else ""
    return (
        f"this run on a CPU: about {gb:.1f} GB of memory{short} and {step_s:.0f} s an optimizer step{total} (scaled from "
        f"{_REFERENCE['gb']} GB and 30-40 s a step measured for Swin-T at 448 px, batch 8, on 2 cores). It is "
        "a GPU recipe: for a try on a CPU use configs/quickstart.yaml, or fewer steps (max_steps=...)"
    )
