"""What a training command finds in its ``run_dir`` before it starts: checked before torch loads.

A run_dir holds one run. Resuming continues it; ``checkpoint.resume=false`` on a folder that already holds
checkpoints or metrics would start a second run on top of the first: its metrics.jsonl cut back, its later
checkpoints left beside the new ones (``latest`` pointing at an earlier step), and the next plain rerun
resuming the first run. So that is refused unless the user says what to do with the earlier run: another
``run_dir``, or ``checkpoint.overwrite=true``, which removes the earlier run's files first.

A resume also keeps the run's ``config.yaml``, so one that is not plain YAML (a python tag) is refused by
name before it would be overwritten. Local folders and ``s3://`` prefixes alike, through fsspec.
"""

from __future__ import annotations

import logging
import os
import shutil

from mtlora_dist.config import ConfigError, TrainConfig, saved_config_text
from mtlora_dist.storage.fs import StorageOptions, is_remote, join, url_to_fs
from mtlora_dist.storage.retry import retry_call

__all__ = ["RUN_FILES", "earlier_run", "check_run_dir", "remove_earlier_run"]

log = logging.getLogger("mtlora_dist")

# What a run writes into its run_dir (the trainer, the run logger, the reports, launch/eval.py's default out=).
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "reports", "eval", "wandb")


def _rows(fs, path: str) -> int:
    with fs.open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def earlier_run(run_dir: str, storage: StorageOptions | None = None) -> str | None:
    """What an earlier run left in ``run_dir`` (``'checkpoints step_00000006, step_00000012 and 12 rows of
    metrics.jsonl'``), or None for a fresh folder."""
    return retry_call(lambda: _earlier_run(run_dir, storage), url=run_dir, options=storage)


def _earlier_run(run_dir: str, storage: StorageOptions | None) -> str | None:
    fs, root = url_to_fs(run_dir, storage)
    fs.invalidate_cache()
    found = []
    try:
        tags = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(join(root, "checkpoints"), detail=False))
    except FileNotFoundError:
        tags = []
    tags = [t for t in tags if t.startswith("step_")]
    if tags:
        found.append(f"checkpoint{'s' * (len(tags) > 1)} {', '.join(tags)}")
    metrics = join(root, "metrics.jsonl")
    rows = _rows(fs, metrics) if fs.exists(metrics) else 0
    if rows:
        found.append(f"{rows} row{'s' * (rows > 1)} of metrics.jsonl")
    return " and ".join(found) or None


def check_run_dir(cfg: TrainConfig, rank: int = 0) -> None:
    """Refuse what would damage the run in ``cfg.run_dir`` (see the module's docstring); with
    ``checkpoint.overwrite=true``, rank 0 removes the earlier run (the other ranks wait for it at the
    process group's rendezvous, before anything is written)."""
    ckpt, run_dir = cfg.checkpoint, cfg.run_dir
    if ckpt.overwrite and ckpt.resume:
        raise ConfigError(
            "checkpoint.overwrite=true removes the earlier run in run_dir; pass it together with "
            "checkpoint.resume=false (or drop it to continue the run)"
        )
    if ckpt.overwrite:
        if rank == 0:
            remove_earlier_run(run_dir, cfg.data.storage)
        return
    saved_config_text(run_dir, cfg.data.storage, action="a resume would overwrite it")
    if ckpt.resume:
        return
    found = earlier_run(run_dir, cfg.data.storage)
    if found:
        raise ConfigError(
            f"run_dir {run_dir} holds an earlier run ({found}), and checkpoint.resume=false would start another "
            "run on top of it (its history cut, its checkpoints mixed with the new ones). Pass a new run_dir=..., "
            "or add checkpoint.overwrite=true to delete the earlier run's files first, or drop "
            "checkpoint.resume=false to continue it"
        )


def remove_earlier_run(run_dir: str, storage: StorageOptions | None = None) -> list[str]:
    """Delete what a run wrote into ``run_dir`` (:data:`RUN_FILES`; nothing else in the folder); returns the
    URLs removed. For an ``s3://`` run_dir, the local copy of its metrics goes too (the run logger's cache)."""
    fs, root = url_to_fs(run_dir, storage)
    removed = []
    for name in RUN_FILES:
        path = join(root, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)
            removed.append(join(run_dir, name))
    if is_remote(run_dir):
        shutil.rmtree(os.path.join(".cache", "runs", run_dir.replace("://", "_").replace("/", "_")), ignore_errors=True)
    if removed:
        log.warning("checkpoint.overwrite=true: removed the earlier run's %s", ", ".join(removed))
    return removed
