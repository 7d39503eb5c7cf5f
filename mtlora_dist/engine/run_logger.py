"""Where a run's numbers go: the console, ``metrics.jsonl`` in the run directory, and wandb.

Only rank 0 logs. ``metrics.jsonl`` is kept locally and re-uploaded whole when the run directory is
remote (object stores have no append), at every evaluation, checkpoint and at the end.
wandb is offline unless configured. The logger is a checkpoint piece: the run id and metrics.jsonl
are stored in each checkpoint, so a resumed run continues the same wandb run and its log holds every
step exactly once, cut back to the checkpoint it resumed from (wandb drops steps it has already seen). The config sent to
wandb has credentials masked and wandb records no command line; an offline run ends with its ``wandb sync`` line.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from typing import Any

from mtlora_dist.storage.atomic import atomic_write, atomic_write_text
from mtlora_dist.storage.fs import StorageOptions, is_remote, join, redact, url_to_fs
from mtlora_dist.storage.retry import retry_call

__all__ = ["RunLogger"]

log = logging.getLogger("mtlora_dist")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class RunLogger:
    """Console + metrics.jsonl + wandb, on rank 0 only."""

    def __init__(
        self,
        run_dir: str,
        *,
        enabled: bool,
        storage: StorageOptions | None = None,
        wandb_cfg=None,
        config: dict | None = None,
        run_id: str | None = None,
        local_dir: str | None = None,
        start: bool = True,
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.storage = storage
        self.remote = is_remote(run_dir)
        self.local_dir = local_dir or (
            os.path.join(".cache", "runs", run_dir.replace("://", "_").replace("/", "_")) if self.remote else run_dir
        )
        self.metrics_path = os.path.join(self.local_dir, "metrics.jsonl")
        self.run_id = run_id
        self.wandb_cfg, self.config = wandb_cfg, config or {}
        self._wandb = None
        if not enabled:
            return
        os.makedirs(self.local_dir, exist_ok=True)
        if self.remote:  # continue the remote file (a resume replaces it with the checkpoint's copy)
            url = join(run_dir, "metrics.jsonl")
            fs, path = url_to_fs(url, storage)
            # the run's first request to a remote run_dir: an unreachable endpoint ends here with one message
            retry_call(lambda: fs.get(path, self.metrics_path) if fs.exists(path) else None, url=url, options=storage)
        if start:
            self.start()

    def start(self) -> None:
        """Start wandb (after a resume has restored the run id, so the same wandb run continues)."""
        cfg = self.wandb_cfg
        if self.enabled and cfg is not None and cfg.enabled and cfg.mode != "disabled" and self._wandb is None:
            self._start_wandb(cfg, self.config)

    # -- checkpoint piece: the log agrees with the checkpoint it resumes from -------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wandb run id and metrics.jsonl as of this checkpoint."""
        text = ""
        if self.enabled and os.path.exists(self.metrics_path):
            with open(self.metrics_path) as fh:
                text = fh.read()
        return {"run_id": self.run_id or "", "metrics": text}

    def load_state_dict(self, state: dict[str, Any], same_world: bool = True) -> None:
        """Cut the log back to the checkpoint: records of steps after it (a killed run's) are dropped,
        and steps the remote copy missed are back."""
        self.run_id = state.get("run_id") or self.run_id
        if not self.enabled:
            return
        atomic_write_text(self.metrics_path, state.get("metrics", ""))
        self.flush()

    def start_over(self) -> None:
        """No checkpoint to continue from: the log starts empty, so rows of an earlier attempt that was
        killed before its first complete checkpoint do not appear twice."""
        self.load_state_dict({"run_id": self.run_id or "", "metrics": ""})

    def _start_wandb(self, cfg, config: dict) -> None:
        import wandb

        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        _service_outside_the_process_tree()
        self._wandb = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            tags=list(cfg.tags),
            mode=cfg.mode,
            id=self.run_id,
            resume="allow",
            dir=self.local_dir,
            config=redact(config),
            settings=wandb.Settings(**_wandb_settings(wandb)),
        )

    def log(self, record: dict[str, Any], *, console: str | None = None) -> None:
        """Append one JSON object (must contain ``step``) and mirror it to wandb."""
        if not self.enabled:
            return
        record = _clean(record)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if console:
            log.info(console)
        if self._wandb is not None:
            flat = _flatten({k: v for k, v in record.items() if k != "step"})
            self._call_wandb(lambda: self._wandb.log(flat, step=int(record["step"])))

    def _call_wandb(self, fn) -> None:
        """wandb is a mirror, never a reason to lose a run: a job scheduler's TERM can kill wandb's
        service process before the trainer's checkpoint; after the first failure wandb is switched off."""
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            log.warning(
                "wandb failed (%s: %s); continuing without wandb (metrics.jsonl has every step)",
                type(err).__name__,
                err,
            )
            self._wandb = None
            _teardown_quietly()

    def log_image(self, key: str, path: str, step: int) -> None:
        if self.enabled and self._wandb is not None:
            import wandb

            self._call_wandb(lambda: self._wandb.log({key: wandb.Image(path)}, step=step))

    def flush(self) -> None:
        """Upload metrics.jsonl when the run directory is remote (one PUT: readers never see half)."""
        if self.enabled and self.remote and os.path.exists(self.metrics_path):
            with open(self.metrics_path, "rb") as fh:
                atomic_write(join(self.run_dir, "metrics.jsonl"), fh.read(), self.storage)

    def close(self) -> None:
        self.flush()
        if self._wandb is not None:
            offline_dir = self._wandb.settings.sync_dir if self.wandb_cfg.mode == "offline" else None
            self._call_wandb(self._wandb.finish)
            if offline_dir and self._wandb is not None:
                log.info("%s", self.sync_hint(offline_dir))
            self._wandb = None

    def sync_hint(self, offline_dir: str) -> str:
        """The command that uploads every offline folder of this wandb run: each job (resume) of it writes
        one (``offline-run-<time>-<id>``), and ``wandb sync`` takes them all."""
        parent = os.path.dirname(offline_dir.rstrip("/"))
        folders = sorted(glob.glob(os.path.join(parent, f"offline-run-*-{self.run_id}")))
        if len(folders) <= 1:
            return f"wandb run saved offline in {offline_dir}; upload it with: wandb sync {offline_dir}"
        pattern = os.path.join(parent, f"offline-run-*-{self.run_id}")
        return (
            f"wandb run saved offline in {len(folders)} folders under {parent} (one per job of this run); "
            f"upload them all with: wandb sync {pattern}"
        )


# Run in a short-lived process: it starts wandb's service detached and prints how to connect to it, then exits.
_START_SERVICE = (
    "import wandb\n"
    "from wandb.sdk.lib.service import service_process\n"
    "print(service_process.start_detached(wandb.Settings(), idle_timeout='30s').token.env_value)\n"
)


def _service_outside_the_process_tree() -> None:
    """Start wandb's service from a process that exits at once, so the service is nobody's child here.

    A launcher that stops a job terminates each rank's whole process tree (the deepspeed launcher's
    Ctrl-C handling): wandb's service, a child of the rank, died before the rank's final ``finish`` and
    the run ended with ``socket.send()`` errors and an atexit traceback. Outside the tree the service
    stays up, ``finish`` completes the wandb run, and the service leaves after 30 idle seconds. Where
    this cannot be done (another wandb version), wandb starts its service as usual."""
    if os.environ.get("WANDB_SERVICE"):
        return
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _START_SERVICE], capture_output=True, text=True, timeout=120, check=True
        )
        token = proc.stdout.strip().splitlines()[-1]
    except (subprocess.SubprocessError, OSError, IndexError) as err:
        log.debug("wandb service not started outside the process tree: %s", err)
        return
    os.environ["WANDB_SERVICE"] = token


def _teardown_quietly() -> None:
    """Close wandb's connection to a service that has gone (a launcher's SIGTERM to the rank's process tree
    reaches it), so wandb's atexit hook does not print a traceback after the run has ended."""
    import wandb

    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001 - the service is gone: nothing left to close cleanly
        pass


def _wandb_settings(wandb) -> dict[str, Any]:
    """Quiet, and no run metadata: wandb records the command line (``sys.argv``) there, and a launcher's
    arguments are not ours to publish. The config it gets is the masked one."""
    fields = getattr(wandb.Settings, "model_fields", {})
    return {"silent": True, **{name: True for name in ("x_disable_meta", "disable_meta") if name in fields}}


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and value is not None:
            out[name] = value
    return out


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
