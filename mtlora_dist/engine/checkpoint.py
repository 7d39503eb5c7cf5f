"""The checkpoint component: save, find, load and retire training checkpoints, local or on S3.

One :class:`Checkpointer` owns everything about checkpoints of one run directory::

    <run_dir>/checkpoints/step_00000100/mp_rank_00_model_states.pt          trainable weights, lr scheduler, step
    <run_dir>/checkpoints/step_00000100/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   one ZeRO shard per rank
    <run_dir>/checkpoints/step_00000100/client_state/rank_<r>.pt             the trainer's per-rank state
    <run_dir>/checkpoints/step_00000100/COMPLETE.json                        marker, written last
    <run_dir>/checkpoints/latest                                              name of the newest complete one

Why it is built this way (details in ``docs/checkpoints.md``):

- Only trainable state is saved (``exclude_frozen_parameters=True``): the frozen backbone comes from its
  pretrained source, so a checkpoint is about the size of the adapters, heads and their Adam moments.
- A checkpoint counts only once its marker exists and every file the marker lists is there with the
  listed size. The marker is one object written after all files, so a save killed at any point leaves
  the previous checkpoint as the newest complete one. ``latest`` is a convenience for people and tools;
  resuming never trusts it alone and scans the folders newest first instead.
- Files are read with ``weights_only=True`` and checked against the marker's sha256 (``safe_load``).
- The marker carries a fingerprint (the run's model/task/adapter settings and the trainable parameter
  names and shapes); loading into a different model is an error that lists the differences.
- With a different number of ranks, ZeRO-1/2 optimizer shards are re-split in memory (``safe_reshard``).
- For S3, each rank writes into its own local staging folder and uploads its files; ranks need not share
  a filesystem. For a local run directory the ranks are assumed to share it (one machine or a cluster FS).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from mtlora_dist import comm
from mtlora_dist.engine.safe_load import (
    ChecksumMismatchError,
    FileRecord,
    SafeTorchCheckpointEngine,
    UnsafeCheckpointError,
    check_plain_data,
    safe_torch_load,
    sha256_file,
    unsafe_globals,
)
from mtlora_dist.engine.safe_reshard import gather_zero_shards, restore_zero_state
from mtlora_dist.storage.fs import StorageOptions, is_remote, join, url_to_fs

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "Checkpointer",
    "ChecksumMismatchError",
    "UnsafeCheckpointError",
    "frozen_fingerprint",
    "step_tag",
]

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MARKER_NAME = "COMPLETE.json"
LATEST_NAME = "latest"
CLIENT_STATE_DIR = "client_state"
FORMAT = "mtlora-dist-checkpoint/1"
_TAG_RE = re.compile(r"^step_(\d{8,})$")
_SHARD_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_CLIENT_RE = re.compile(rf"^{CLIENT_STATE_DIR}/rank_(\d+)\.pt$")
_MAX_LISTED = 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written for another model or configuration."""


def step_tag(step: int) -> str:
    """Folder name of the checkpoint taken after ``step`` optimizer steps (sorts by step as text too)."""
    return f"step_{int(step):08d}"


# --------------------------------------------------------------------------------------------- helpers

def frozen_fingerprint(model: nn.Module) -> str:
    """sha256 over name, dtype, shape and bytes of every frozen parameter of ``model``.

    Record it when the run starts and compare after a resume: checkpoints hold no frozen weights, so a
    resumed run is only right if the backbone was rebuilt from the same pretrained source (DeepSpeed
    #3090 and #6771 are reports of frozen weights silently changing on resume). Reading ~350 MB of a
    Swin-B backbone takes well under a second. Not meaningful under ZeRO-3, whose parameters are
    partitioned across ranks.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        tensor = param.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(param.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------- distributed


def _agree(error: BaseException | None, what: str) -> None:
    """Collective: if any rank failed, every rank raises, so none is left waiting in a later collective.
    A rank that failed raises its own exception; the others raise :class:`CheckpointError` naming it."""
    messages = [m for m in comm.all_gather_object(None if error is None else _describe(error)) if m]
    if not messages:
        return
    if error is not None:
        raise error
    more = f" (and {len(messages) - 1} more ranks)" if len(messages) > 1 else ""
    raise CheckpointError(f"{what}: {messages[0]}{more}")


def _attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """``(fn(), None)``, or ``(None, the exception)``: a rank's failure is held until the ranks agree on it."""
    try:
        return fn(), None
    except Exception as err:  # noqa: BLE001 - raised on every rank by _agree
        return None, err


def _describe(error: BaseException) -> str:
    return f"rank {comm.rank()}: {type(error).__name__}: {error}"


# ------------------------------------------------------------------------------------- fingerprints


def _trainable_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Full shapes; under ZeRO-3 a parameter is an empty placeholder and ``ds_shape`` holds its shape."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters() if p.requires_grad}


def _normalize(value: Any) -> Any:
    """JSON round trip, so tuples and lists (or an OmegaConf node and its dict) compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix[:-1] or "<root>": value}


def _short_list(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable lines describing how two fingerprints differ (empty when they match)."""
    lines = []
    saved_params, params = saved.get("trainable", {}), current.get("trainable", {})
    missing = set(params) - set(saved_params)
    unexpected = set(saved_params) - set(params)
    mismatched = [f"{n}: checkpoint {saved_params[n]} vs model {params[n]}"
                  for n in sorted(set(params) & set(saved_params)) if saved_params[n] != params[n]]
    if missing:
        lines.append(f"missing keys (trainable in this model, not in the checkpoint): {_short_list(missing)}")
    if unexpected:
        lines.append(f"unexpected keys (in the checkpoint, not trainable in this model): {_short_list(unexpected)}")
    if mismatched:
        lines.append(f"shape mismatches: {_short_list(mismatched)}")
    saved_cfg, cfg = _flatten(saved.get("config", {})), _flatten(current.get("config", {}))
    changed = [f"{k}: checkpoint {saved_cfg.get(k, '<absent>')!r} vs this run {cfg.get(k, '<absent>')!r}"
               for k in sorted(set(saved_cfg) | set(cfg)) if saved_cfg.get(k, "<absent>") != cfg.get(k, "<absent>")]
    if changed:
        lines.append(f"config differences: {_short_list(changed)}")
    return lines


# ------------------------------------------------------------------------------------- the component


class Checkpointer:
    """Saves, finds, loads and retires the checkpoints of one run directory (local path or ``s3://`` URL).

    Args:
        run_dir: the run's folder; checkpoints go to ``<run_dir>/checkpoints``. Stays a string: a ``Path``
            would turn ``s3://b/x`` into the local folder ``s3:/b/x``.
        keep_last: how many complete checkpoints to keep (0 keeps all). Older ones are deleted only after
            a newer one is complete.
        storage: object-storage settings for ``s3://`` run directories.
        fingerprint: plain data that identifies what this run trains (model name, tasks, adapter settings);
            stored in each marker and compared on load together with the trainable parameter names/shapes.
        local_cache: local scratch folder for S3 staging and downloads (default: under the system temp dir).
            Each rank uses its own subfolder.
    """

    def __init__(self, run_dir: str, *, keep_last: int = 3, storage: StorageOptions | None = None,
                 fingerprint: dict | None = None, local_cache: str | None = None) -> None:
        self.run_dir = str(run_dir).rstrip("/")
        self.root = join(self.run_dir, CHECKPOINTS_DIR)
        self.keep_last = keep_last
        self.remote = is_remote(self.root)
        self.fingerprint = _normalize(fingerprint or {})
        self._fs, self._root_path = url_to_fs(self.root, storage)
        digest = hashlib.sha256(self.root.encode()).hexdigest()[:12]
        self.local_cache = local_cache or os.path.join(tempfile.gettempdir(), "mtlora-ckpt", digest)
        self._last_saved: str | None = None
        self.loaded_tag: str | None = None
        self.loaded_world_size: int | None = None

    def __repr__(self) -> str:
        return f"Checkpointer({self.root!r}, keep_last={self.keep_last})"

    # ----------------------------------------------------------------------------------- public API

    def url(self, tag: str) -> str:
        return join(self.root, tag)

    def save(self, engine: Any, step: int, client_state: dict) -> str:
        """Write a checkpoint of ``engine`` after ``step`` and return its URL. Collective: call on every rank.

        ``client_state`` is this rank's plain-data state (data position, RNG states, run ids); it is saved
        per rank. Returns only after the checkpoint is complete (marker and ``latest`` written).
        """
        _agree(_attempt(lambda: check_plain_data(client_state))[1], "a rank's client_state cannot be saved")
        tag = step_tag(step)
        if self._last_saved == tag:  # e.g. the periodic save and a signal-triggered one at the same step
            return self.url(tag)
        ce = self._install_engine(engine)
        _agree(self._run_rank0(lambda: self._prepare_tag(tag)), f"could not prepare {self.url(tag)}")
        records, error = _attempt(lambda: self._write_rank_files(engine, ce, tag, client_state))
        _agree(error, f"checkpoint {self.url(tag)} was not written")
        files = {name: rec for part in comm.all_gather_object(records) for name, rec in part.items()}
        error = self._run_rank0(lambda: self._commit(engine, tag, step, files))
        message = comm.broadcast_object(None if error is None else _describe(error))
        if message:
            raise CheckpointError(f"checkpoint {self.url(tag)} was not completed: {message}") from error
        self._last_saved = tag
        return self.url(tag)

    def latest(self) -> str | None:
        """Tag of the newest complete checkpoint (marker present, every listed file there with its size)."""
        for tag in self._tags_newest_first():
            if self._verified_marker(tag) is not None:
                return tag
        return None

    def load(self, engine: Any, tag: str | None = None) -> dict | None:
        """Restore ``engine`` from ``tag`` (default: the newest complete checkpoint). Collective.

        Returns this rank's client state, or ``None`` when the run directory has no complete checkpoint
        (a fresh start). With a different number of ranks than the saving run, the returned client state
        is rank 0's: per-rank entries such as data positions must then be re-derived by the trainer
        (``self.loaded_world_size`` says what the saving run had).
        """
        choice, error = None, None
        if comm.rank() == 0:
            try:
                self._abort_stale_uploads()
                choice = self._choose(tag)
            except Exception as err:  # noqa: BLE001 - raised on every rank below
                error, choice = err, {"error": _describe(err)}
        choice = comm.broadcast_object(choice)
        if choice is None:
            return None
        if "error" in choice:
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"cannot resume from {self.root}: {choice['error']}") from error
        tag, marker = choice["tag"], choice["marker"]
        self._check_fingerprint(engine, tag, marker)
        client = self._restore(engine, tag, marker)
        self.loaded_tag, self.loaded_world_size = tag, int(marker["world_size"])
        self._last_saved = None
        log.info("resumed from %s (step %s, saved by %s ranks)", self.url(tag), marker["step"], marker["world_size"])
        return client

    # ----------------------------------------------------------------------------------- saving

    def _install_engine(self, engine: Any) -> SafeTorchCheckpointEngine:
        """Put our checkpoint engine where DeepSpeed looks for it (``engine.checkpoint_engine``)."""
        current = getattr(engine, "checkpoint_engine", None)
        if isinstance(current, SafeTorchCheckpointEngine):
            return current
        if current is not None and current.is_decoupled():
            raise CheckpointError(f"DeepSpeed's {type(current).__name__} writes in the background; our markers "
                                  "need synchronous saves: remove checkpoint.writer from the DeepSpeed config")
        ce = SafeTorchCheckpointEngine(getattr(engine, "_config", None))
        engine.checkpoint_engine = ce
        return ce

    def _prepare_tag(self, tag: str) -> None:
        """Rank 0, before anyone writes: no stale marker or files of an earlier attempt at this step."""
        self._abort_stale_uploads()
        self._delete(tag)
        if not self.remote:
            os.makedirs(self._root_path, exist_ok=True)

    def _write_root(self) -> str:
        """Where DeepSpeed writes: the shared checkpoints folder, or this rank's staging folder for S3."""
        if not self.remote:
            return self._root_path
        staging = os.path.join(self.local_cache, f"stage-rank{comm.rank():05d}")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        return staging

    def _write_rank_files(self, engine: Any, ce: SafeTorchCheckpointEngine, tag: str,
                          client_state: dict) -> dict[str, FileRecord]:
        """Every rank: DeepSpeed's files plus our client state; for S3, upload them. Returns their records."""
        root = self._write_root()
        tag_dir = os.path.normpath(os.path.join(root, tag))
        ce.expected, ce.written = None, {}
        engine.save_checkpoint(root, tag=tag, client_state={}, save_latest=False, exclude_frozen_parameters=True)
        ce.save_plain(client_state, os.path.join(tag_dir, CLIENT_STATE_DIR, f"rank_{comm.rank():05d}.pt"))
        records = {os.path.relpath(path, tag_dir).replace(os.sep, "/"): rec
                   for path, rec in ce.written.items() if path.startswith(tag_dir + os.sep)}
        if len(records) < 2 and comm.rank() == 0:  # rank 0 writes at least model states and its client state
            raise CheckpointError(f"DeepSpeed wrote no files into {tag_dir} through engine.checkpoint_engine")
        if self.remote:
            for name in records:
                self._fs.put_file(os.path.join(tag_dir, name), f"{self._root_path}/{tag}/{name}")
            shutil.rmtree(root, ignore_errors=True)
        return records

    def _commit(self, engine: Any, tag: str, step: int, files: dict[str, FileRecord]) -> None:
        """Rank 0, after every rank's files are in place: check them, then write marker, ``latest``, retire."""
        listing = self._list_sizes(tag)
        bad = [f"{name} ({'missing' if name not in listing else f'{listing[name]} bytes, expected {rec.size}'})"
               for name, rec in files.items() if listing.get(name) != rec.size]
        if bad:
            raise CheckpointError(f"files did not arrive intact: {_short_list(bad)}")
        marker = self._make_marker(engine, tag, step, files)
        self._write_bytes(f"{self._root_path}/{tag}/{MARKER_NAME}", json.dumps(marker, indent=1).encode())
        self._write_bytes(f"{self._root_path}/{LATEST_NAME}", tag.encode())
        try:
            self._retire_old(int(step))
        except Exception as err:  # noqa: BLE001 - the new checkpoint is complete; old ones go next time
            log.warning("could not delete old checkpoints under %s: %s", self.root, err)

    def _current_fingerprint(self, engine: Any) -> dict[str, Any]:
        return {"config": self.fingerprint, "trainable": _trainable_shapes(engine.module)}

    def _make_marker(self, engine: Any, tag: str, step: int, files: dict[str, FileRecord]) -> dict[str, Any]:
        import deepspeed

        return {
            "format": FORMAT,
            "tag": tag,
            "step": int(step),
            "world_size": comm.world_size(),
            "zero_stage": int(engine.zero_optimization_stage()),
            "created_unix": time.time(),
            "versions": {"deepspeed": deepspeed.__version__, "torch": torch.__version__},
            "fingerprint": self._current_fingerprint(engine),
            "files": {name: {"size": rec.size, "sha256": rec.sha256} for name, rec in sorted(files.items())},
        }

    def _retire_old(self, step: int) -> None:
        """Delete checkpoints older than the ``keep_last`` newest complete ones (and older partial ones)."""
        if self.keep_last <= 0:
            return
        tags = self._tags_newest_first()
        complete = [t for t in tags if self._verified_marker(t) is not None]
        keep = set(complete[: self.keep_last])
        for tag in tags:
            if tag not in keep and _tag_step(tag) < step:
                self._delete(tag)

    # ----------------------------------------------------------------------------------- loading

    def _choose(self, tag: str | None) -> dict[str, Any] | None:
        """Rank 0: the checkpoint to load and its marker (``None``: nothing to resume)."""
        if tag is None:
            tag = self.latest()
            if tag is None:
                return None
        marker = self._verified_marker(tag)
        if marker is None:
            raise CheckpointError(f"{self.url(tag)} is not a complete checkpoint (no marker, or files missing or "
                                  f"cut short); complete ones: {self._complete_tags() or 'none'}")
        return {"tag": tag, "marker": marker}

    def _check_fingerprint(self, engine: Any, tag: str, marker: dict[str, Any]) -> None:
        problems = fingerprint_differences(marker.get("fingerprint", {}), self._current_fingerprint(engine))
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.url(tag)} was written for a different model or configuration:\n  "
                + "\n  ".join(problems)
                + f"\nTo continue that run, start it with the config it was saved with. To train this model/config "
                f"instead, point run_dir at a new folder (the checkpoints in {self.run_dir} belong to "
                f"the other run), or load a checkpoint saved with this config.")

    def _restore(self, engine: Any, tag: str, marker: dict[str, Any]) -> dict:
        """Every rank: fetch and verify the files it needs, load them into the engine, read its client state."""
        same_world = int(marker["world_size"]) == comm.world_size()
        if not same_world:
            _require_reshardable(engine)
        # DeepSpeed's elastic_checkpoint option makes every rank read every shard, even at the same size.
        own_shard_only = same_world and not getattr(engine.optimizer, "elastic_checkpoint", False)
        needed = self._files_needed(marker, same_world, own_shard_only)
        load_root, error = _attempt(lambda: self._materialize(tag, marker, needed))
        _agree(error, f"cannot read {self.url(tag)}")
        ce = self._install_engine(engine)
        tag_dir = os.path.join(load_root, tag)
        ce.expected = {os.path.normpath(os.path.join(tag_dir, name)): meta["sha256"]
                       for name, meta in marker["files"].items()}
        try:
            self._load_engine(engine, load_root, tag, marker, same_world)
            client_name = self._client_state_name(marker, same_world)
            client = safe_torch_load(os.path.join(tag_dir, client_name), allow_deepspeed=False,
                                     expected_sha256=marker["files"][client_name]["sha256"])
        finally:
            ce.expected = None
            if self.remote:
                shutil.rmtree(load_root, ignore_errors=True)
        return client

    def _load_engine(self, engine: Any, load_root: str, tag: str, marker: dict[str, Any], same_world: bool) -> None:
        zero_stage = int(engine.zero_optimization_stage())
        reshard = not same_world and zero_stage in (1, 2)
        path, _ = engine.load_checkpoint(load_root, tag, load_module_strict=False,
                                         load_optimizer_states=not reshard, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no model states in {self.url(tag)}")
        if reshard:
            shards = [engine.checkpoint_engine.load(os.path.join(load_root, tag, name), map_location="cpu")
                      for name in _shard_names(marker)]
            restore_zero_state(engine, gather_zero_shards(shards))
        _relink_optimizer_fragments(engine)

    def _files_needed(self, marker: dict[str, Any], same_world: bool, own_shard_only: bool) -> list[str]:
        """Model states and other shared files, this rank's client state (rank 0's when the number of ranks
        changed), and this rank's ZeRO shard, or all shards unless ``own_shard_only``."""
        client_name = self._client_state_name(marker, same_world)
        needed = []
        for name in marker["files"]:
            shard, client = _SHARD_RE.match(name.rsplit("/", 1)[-1]), _CLIENT_RE.match(name)
            if client:
                if name == client_name:
                    needed.append(name)
            elif shard and own_shard_only:
                if int(shard.group(1)) == _dp_rank():
                    needed.append(name)
            else:
                needed.append(name)
        return needed

    def _client_state_name(self, marker: dict[str, Any], same_world: bool) -> str:
        name = f"{CLIENT_STATE_DIR}/rank_{(comm.rank() if same_world else 0):05d}.pt"
        if name not in marker["files"]:
            raise CheckpointError(f"the checkpoint has no client state {name}")
        return name

    def _materialize(self, tag: str, marker: dict[str, Any], needed: list[str]) -> str:
        """Local folder holding ``<tag>/<needed files>``, checksums verified. For S3 they are downloaded to
        this rank's cache; a local run directory is read in place."""
        if self.remote:
            load_root = os.path.join(self.local_cache, f"load-rank{comm.rank():05d}")
            shutil.rmtree(load_root, ignore_errors=True)
            for name in needed:
                local = os.path.join(load_root, tag, name)
                os.makedirs(os.path.dirname(local), exist_ok=True)
                self._fs.get_file(f"{self._root_path}/{tag}/{name}", local)
        else:
            load_root = self._root_path
        for name in needed:
            path, expected = os.path.join(load_root, tag, name), marker["files"][name]["sha256"]
            actual = sha256_file(path)
            if actual != expected:
                raise ChecksumMismatchError(
                    f"{self.url(tag)}/{name} has sha256 {actual}, its marker lists {expected}: the file changed "
                    "after the checkpoint was completed; load an older checkpoint by tag or delete this one")
            refused = unsafe_globals(path, allow_deepspeed=not _CLIENT_RE.match(name))
            if refused:
                raise UnsafeCheckpointError(
                    f"refusing to load {self.url(tag)}/{name}: it would unpickle {_short_list(refused)}, which "
                    "weights-only loading does not allow (it could run code). Do not load this checkpoint "
                    "unless you know where it came from.")
        return load_root

    # ----------------------------------------------------------------------------------- storage

    def _tags_newest_first(self) -> list[str]:
        self._fs.invalidate_cache()
        try:
            entries = self._fs.ls(self._root_path, detail=False)
        except FileNotFoundError:
            return []
        tags = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted((t for t in tags if _TAG_RE.match(t)), key=_tag_step, reverse=True)

    def _complete_tags(self) -> list[str]:
        return [t for t in self._tags_newest_first() if self._verified_marker(t) is not None]

    def _verified_marker(self, tag: str) -> dict[str, Any] | None:
        """The marker of ``tag`` if it is readable, matches the tag, and every file it lists is present
        with its listed size; otherwise ``None``. Checksums are checked when files are read."""
        try:
            marker = json.loads(self._fs.cat_file(f"{self._root_path}/{tag}/{MARKER_NAME}"))
        except (FileNotFoundError, ValueError):
            return None
        if marker.get("format") != FORMAT or marker.get("tag") != tag or not marker.get("files"):
            return None
        listing = self._list_sizes(tag)
        if any(listing.get(name) != meta["size"] for name, meta in marker["files"].items()):
            return None
        return marker

    def _list_sizes(self, tag: str) -> dict[str, int]:
        """Relative name -> size of every file under the checkpoint folder ``tag``."""
        base = f"{self._root_path}/{tag}"
        self._fs.invalidate_cache()
        try:
            found = self._fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        prefix = base.rstrip("/") + "/"
        return {path[len(prefix):]: int(info["size"]) for path, info in found.items() if path.startswith(prefix)}

    def _write_bytes(self, path: str, data: bytes) -> None:
        """Atomic write: one PUT on S3, temporary file plus rename locally."""
        if self.remote:
            self._fs.pipe_file(path, data)
            return
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _delete(self, tag: str) -> None:
        """Remove a checkpoint marker first, so a half-deleted checkpoint never looks complete."""
        base = f"{self._root_path}/{tag}"
        self._fs.invalidate_cache()
        if self._fs.exists(f"{base}/{MARKER_NAME}"):
            self._fs.rm_file(f"{base}/{MARKER_NAME}")
        if self.remote:
            if self._fs.find(base):
                self._fs.rm(base, recursive=True)
        else:
            shutil.rmtree(base, ignore_errors=True)

    def _abort_stale_uploads(self) -> None:
        """Abort unfinished multipart uploads under our prefix (left by a save that was killed). Only called
        while no rank is uploading: at load time and before a save starts."""
        if not self.remote or not hasattr(self._fs, "call_s3"):
            return
        bucket, _, key = self._root_path.partition("/")
        try:
            for upload in _multipart_uploads(self._fs, bucket, key.rstrip("/") + "/"):
                self._fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                                 UploadId=upload["UploadId"])
                log.info("aborted stale multipart upload of s3://%s/%s", bucket, upload["Key"])
        except Exception as err:  # noqa: BLE001 - a server without the call must not stop training
            log.warning("could not list/abort stale multipart uploads under %s: %s", self.root, err)

    @staticmethod
    def _run_rank0(fn: Callable[[], Any]) -> BaseException | None:
        """Run ``fn`` on rank 0; returns its exception (``None`` on success and on other ranks)."""
        return _attempt(fn)[1] if comm.rank() == 0 else None


def _multipart_uploads(fs: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    uploads, kwargs = [], {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = fs.call_s3("list_multipart_uploads", **kwargs)
        uploads.extend(page.get("Uploads", []))
        if not page.get("IsTruncated"):
            return uploads
        kwargs.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))


def _tag_step(tag: str) -> int:
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else -1


def _shard_names(marker: dict[str, Any]) -> list[str]:
    """ZeRO shard files of a checkpoint, ordered by the data-parallel rank that wrote them."""
    shards = [(int(m.group(1)), name) for name in marker["files"]
              if (m := _SHARD_RE.match(name.rsplit("/", 1)[-1]))]
    ranks = [r for r, _ in sorted(shards)]
    if ranks != list(range(int(marker["world_size"]))):
        raise CheckpointError(f"expected ZeRO shards of ranks 0..{int(marker['world_size']) - 1}, found {ranks}")
    return [name for _, name in sorted(shards)]


def _relink_optimizer_fragments(engine: Any) -> None:
    """Point DeepSpeed's per-parameter optimizer-state views at the state tensors just loaded.

    DeepSpeed 0.19 links them once, after the first step; a load replaces the tensors, and the views of an
    engine that had already stepped would keep showing the old ones, so ``safe_get_full_optimizer_state``
    (which trainers use for logging) would read stale or missing moments until relinked.
    """
    optimizer = engine.optimizer
    if not hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        return
    base = optimizer.optimizer
    if all(base.state.get(group["params"][0]) for group in base.param_groups):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _dp_rank() -> int:
    """Data-parallel rank; equal to the global rank here (no tensor or pipeline parallelism)."""
    return comm.rank()


def _require_reshardable(engine: Any) -> None:
    """ZeRO-3 checkpoints resume on the same number of ranks only (DeepSpeed's own stage-3 format)."""
    if int(engine.zero_optimization_stage()) >= 3:
        raise CheckpointError("this ZeRO-3 checkpoint was written by a different number of ranks; ZeRO-3 "
                              "checkpoints resume only on the same number of ranks. Resume with the original "
                              "world size, or train with ZeRO stage 1 or 2 (the MTLoRA trainable state is small).")
