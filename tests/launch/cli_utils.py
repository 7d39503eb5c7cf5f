"""Running the entry points the way users do: a fresh interpreter, a short run, its output and exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from runs import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
# The tiny quickstart: two optimizer steps, no evaluation grid, nothing read from the network.
TINY = [*TINY_RUN, "eval.max_batches=1", "eval.visual_samples=0", "max_steps=2"]
# Short retries, so an unreachable endpoint fails in a second or two.
FAST_FAIL = ["data.storage.retries=0", "data.storage.read_retries=1", "data.storage.retry_delay_s=0.05"]


def run(
    args: list[str],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: int = 300,
    python: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """``python <args>`` in ``cwd`` with a quiet, offline environment; never raises on a non-zero status."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [*(python or [sys.executable]), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def script(name: str) -> str:
    return str(REPO / "launch" / name)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr
