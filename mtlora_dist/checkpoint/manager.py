"""The checkpoint component: what is saved, when, and how a run resumes from it.

Stateful pieces register once (``register(name, piece, per_rank=...)``): anything with
``state_dict()`` and ``load_state_dict(state, same_world)`` whose state is plain data and tensors (the
data position, the RNG, the run log). With the DeepSpeed engine's trainable state
(:mod:`~mtlora_dist.checkpoint.trainable`) they make the checkpoint; the trainer only asks
``should_save`` and calls ``save``. Every public method is a collective: call it on every rank.

Rank 0 writes everything (the other ranks send their per-rank pieces), so ranks need no shared
filesystem. A local run directory is written in place; for ``s3://`` the step waits only for the
local snapshot and the upload runs beside training (:class:`~mtlora_dist.checkpoint.storage.Uploader`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Protocol

from mtlora_dist import comm
from mtlora_dist.checkpoint import trainable as trainable_state
from mtlora_dist.checkpoint.format import (
    CLIENT,
    FORMAT,
    STATE,
    TRAINABLE,
    CheckpointError,
    CheckpointMismatchError,
    fingerprint_differences,
    frozen_fingerprint,
    normalize,
    pack,
    step_tag,
    tensors_from_bytes,
    tensors_to_bytes,
    trainable_shapes,
    unpack,
)
from mtlora_dist.checkpoint.storage import CheckpointStore, Uploader
from mtlora_dist.storage.fs import StorageOptions, join
from mtlora_dist.storage.retry import StorageUnavailableError, is_transient, unreachable_message

__all__ = ["Checkpointer", "SavePolicy", "Stateful"]

log = logging.getLogger("mtlora_dist")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], same_world: bool) -> None: ...


@dataclass(frozen=True)
class SavePolicy:
    """When to save: every ``every`` steps (0: never periodically), at the last step, and on a stop."""

    every: int = 0
    keep_last: int = 3


def checked_state(raw: bytes, marker: dict, client: dict, url: str) -> dict:
    """``state.json`` parsed and checked against the schema ``save`` writes (and the marker's world size),
    so a changed file is a CheckpointError naming it, not a TypeError deep inside a restore."""

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(
            f"{url} is not a checkpoint state ({why}); the file was changed after the checkpoint was written: "
            "resume from another checkpoint or start a new run_dir"
        )

    try:
        state = json.loads(raw)
    except ValueError as err:
        raise refuse(f"not JSON: {err}") from None
    counters = ("global_steps", "global_samples", "optimizer_step")
    world = marker.get("world_size")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise refuse("not a JSON object with an integer 'step'")
    if not isinstance(world, int) or world < 1:
        raise refuse("the marker's world_size is not a positive integer")
    engine, pieces, per_rank = state.get("engine"), state.get("pieces"), state.get("per_rank")
    if not isinstance(engine, dict) or not all(isinstance(engine.get(k), int) for k in counters):
        raise refuse(f"'engine' lacks integer {', '.join(counters)}")
    if not isinstance(pieces, dict):
        raise refuse("'pieces' is not an object")
    if not isinstance(per_rank, list) or len(per_rank) != world or not all(isinstance(p, dict) for p in per_rank):
        raise refuse(f"'per_rank' is not a list of {world} object(s), one per rank that saved it")
    refs = set()
    _collect_refs(state, refs)
    if refs - set(client):
        raise refuse(f"it refers to tensors that client.safetensors lacks: {sorted(refs - set(client))[:4]}")
    return state


def _collect_refs(value: Any, refs: set) -> None:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            refs.add(str(value["__tensor__"]))
            return
        for sub in value.values():
            _collect_refs(sub, refs)
    elif isinstance(value, list):
        for sub in value:
            _collect_refs(sub, refs)


class Checkpointer:
    """Saves, finds and loads the checkpoints of one run directory (local path or ``s3://`` URL).

    Args:
        run_dir: the run's folder; checkpoints go to ``<run_dir>/checkpoints``. Stays a string: a ``Path``
            would turn ``s3://b/x`` into the local folder ``s3:/b/x``.
        engine: the DeepSpeed engine whose trainable state is saved; make the Checkpointer before the
            engine's first step.
        policy: when to save and how many complete checkpoints to keep.
        fingerprint: plain data that identifies what this run trains (model, tasks, adapter); stored in
            each marker and compared on load, with the trainable parameter names and shapes and a hash
            of the frozen weights.
        storage: object-storage settings for ``s3://`` run directories.
        local_cache: scratch folder for the local snapshot of an ``s3://`` checkpoint.
    """

    def __init__(
        self,
        run_dir: str,
        engine: Any,
        *,
        policy: SavePolicy = SavePolicy(),
        fingerprint: dict | None = None,
        storage: StorageOptions | None = None,
        local_cache: str | None = None,
    ) -> None:
        trainable_state.check_supported(engine)
        trainable_state.prepare_optimizer_state(engine)  # before the first step: see its docstring
        self.engine = engine
        self.policy = policy
        self.store = CheckpointStore(join(str(run_dir).rstrip("/"), "checkpoints"), storage, policy.keep_last)
        self.uploader = Uploader(self.store)
        self.fingerprint = {"config": normalize(fingerprint or {}), "trainable": trainable_shapes(engine.module)}
        self.frozen = frozen_fingerprint(engine.module)
        digest = hashlib.sha256(self.store.root.encode()).hexdigest()[:12]
        self.local_cache = local_cache or os.path.join(tempfile.gettempdir(), "mtlora-ckpt", digest)
        self._pieces: dict[str, tuple[Stateful, bool]] = {}
        self._last_saved: int | None = None
        self._aborted_stale = False
        self.blocked_s: list[float] = []  # how long each save held the training loop
        self.loaded_world_size: int | None = None

    def register(self, name: str, piece: Stateful, *, per_rank: bool) -> None:
        """Add a stateful piece; ``per_rank`` pieces keep one state per rank (data position, RNG)."""
        self._pieces[name] = (piece, per_rank)

    # -- policy ------------------------------------------------------------------------------------
    def should_save(self, step: int, *, final: bool, stopping: bool) -> bool:
        periodic = bool(self.policy.every) and step % self.policy.every == 0
        return (periodic or final or stopping) and step != self._last_saved

    # -- saving ------------------------------------------------------------------------------------
    def save(self, step: int) -> str:
        """Write the checkpoint of ``step``; returns its URL. Remote uploads finish in the background
        (``wait`` blocks for them)."""
        start = time.perf_counter()
        tensors = trainable_state.gather_trainable(self.engine)  # collective
        mine = {name: piece.state_dict() for name, (piece, per_rank) in self._pieces.items() if per_rank}
        per_rank = comm.all_gather_object(mine)
        shared = {name: piece.state_dict() for name, (piece, per_rank) in self._pieces.items() if not per_rank}
        tag = step_tag(step)
        error = None
        if comm.rank() == 0:
            try:
                self._write(tag, step, tensors, per_rank, shared)
            except Exception as err:  # noqa: BLE001 - every rank raises below
                error = err
        message = comm.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if message:
            raise CheckpointError(f"checkpoint {self.store.url(tag)} was not written: {message}") from error
        self._last_saved = step
        self.blocked_s.append(time.perf_counter() - start)
        return self.store.url(tag)

    def _write(self, tag: str, step: int, tensors: dict, per_rank: list[dict], shared: dict) -> None:
        self.uploader.wait_quietly()
        if not self._aborted_stale:
            self.store.abort_stale_uploads()
            self._aborted_stale = True
        client_tensors: dict = {}
        state = {
            "step": step,
            "engine": trainable_state.engine_counters(self.engine),
            "pieces": pack(shared, "shared", client_tensors),
            "per_rank": [pack(p, f"rank{r}", client_tensors) for r, p in enumerate(per_rank)],
        }
        files = {
            TRAINABLE: tensors_to_bytes(tensors),
            CLIENT: tensors_to_bytes(client_tensors),
            STATE: json.dumps(state, sort_keys=True).encode(),
        }
        folder = os.path.join(self.local_cache, tag) if self.store.remote else self.store.url(tag)
        shutil.rmtree(folder, ignore_errors=True)
        marker = {
            "format": FORMAT,
            "tag": tag,
            "step": step,
            "world_size": comm.world_size(),
            "zero_stage": int(self.engine.zero_optimization_stage()),
            "fingerprint": self.fingerprint,
            "frozen": self.frozen,
            "files": self.store.write_files(folder, files),
        }
        if self.store.remote:
            self.uploader.start(tag, folder, marker)
        else:
            self.store.publish(tag, folder, marker)

    def wait(self) -> None:
        """Block until a background upload is complete (before exiting); raise if it failed."""
        error = None
        if comm.rank() == 0:
            try:
                self.uploader.wait()
            except CheckpointError as err:
                error = err
        message = comm.broadcast_object(None if error is None else str(error))
        if message:
            raise CheckpointError(message) from error

    # -- loading -----------------------------------------------------------------------------------
    def latest(self) -> str | None:
        found = self.store.newest_complete()
        return found[0] if found else None

    def resume(self) -> int | None:
        """Restore the newest complete checkpoint into the engine and every registered piece; returns its
        step, or ``None`` when there is none (a fresh start)."""
        choice, failure = None, None
        if comm.rank() == 0:
            try:
                self.store.abort_stale_uploads()
                found = self.store.newest_complete()
                choice = {"tag": found[0], "marker": found[1]} if found else None
            except Exception as err:  # noqa: BLE001 - every rank learns of it below (no rank left waiting)
                failure = err
                choice = {"error": self._lookup_failure(err), "unreachable": is_transient(err)}
        choice = comm.broadcast_object(choice)
        if failure is not None and not isinstance(failure, CheckpointError) and not is_transient(failure):
            raise failure  # a bug: its own traceback (the other ranks raise the message below)
        if choice is None:
            return None
        if "error" in choice:
            raise (StorageUnavailableError if choice["unreachable"] else CheckpointError)(choice["error"])
        tag, marker = choice["tag"], choice["marker"]
        self._check_fingerprint(tag, marker)
        tensors = tensors_from_bytes(self.store.read(tag, TRAINABLE, marker))
        client = tensors_from_bytes(self.store.read(tag, CLIENT, marker))
        state = checked_state(self.store.read(tag, STATE, marker), marker, client, self.store.url(tag, STATE))
        trainable_state.restore_trainable(self.engine, tensors, int(state["engine"]["optimizer_step"]))
        trainable_state.restore_counters(self.engine, state["engine"])
        self._restore_pieces(state, client, int(marker["world_size"]))
        self.loaded_world_size, self._last_saved = int(marker["world_size"]), int(marker["step"])
        ranks = int(marker["world_size"])
        log.info(
            "resumed from %s (step %s, saved by %d rank%s)",
            self.store.url(tag),
            marker["step"],
            ranks,
            "s" * (ranks != 1),
        )
        return int(marker["step"])

    def _lookup_failure(self, err: BaseException) -> str:
        if isinstance(err, CheckpointError):
            return str(err)
        if is_transient(err):  # the endpoint is down or unreachable: say where and what to check
            return unreachable_message(self.store.root, err, 1, self.store.storage)
        return f"looking for checkpoints under {self.store.root} failed: {type(err).__name__}: {err}"

    def _restore_pieces(self, state: dict, client: dict, saved_world: int) -> None:
        same_world = saved_world == comm.world_size()
        shared = unpack(state["pieces"], client)
        mine = unpack(state["per_rank"][comm.rank() if same_world else 0], client)
        for name, (piece, per_rank) in self._pieces.items():
            source = mine if per_rank else shared
            if name in source:
                piece.load_state_dict(source[name], same_world)

    def _check_fingerprint(self, tag: str, marker: dict) -> None:
        problems = fingerprint_differences(marker.get("fingerprint", {}), self.fingerprint)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.store.url(tag)} was written for another model or configuration:\n  "
                + "\n  ".join(problems)
                + "\nResume with the run's own config, or start a new run_dir."
            )
        zero3 = 3 in (int(marker.get("zero_stage", 0)), int(self.engine.zero_optimization_stage()))
        if marker.get("frozen") and marker["frozen"] != self.frozen and not zero3:  # ZeRO-3 hashes placeholders
            raise CheckpointMismatchError(
                f"the frozen backbone differs from the one {self.store.url(tag)} was trained on; check "
                "model.pretrained (same file as the original run) and model.backbone"
            )
