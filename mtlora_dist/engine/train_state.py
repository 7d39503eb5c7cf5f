"""The trainer's per-rank pieces of a checkpoint (data position and RNG, see ``checkpoint.manager``), and
the resume's one decision made before the engine exists: which gradient accumulation keeps the saved
global batch on this world size (:func:`fit_saved_global_batch`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from mtlora_dist import comm
from mtlora_dist.checkpoint.format import STATE, CheckpointError
from mtlora_dist.checkpoint.storage import CheckpointStore
from mtlora_dist.config import TrainConfig
from mtlora_dist.engine.rng import rng_state, seed_everything, set_rng_state
from mtlora_dist.storage.fs import join

__all__ = ["DataPosition", "RNGState", "SavedBatch", "saved_batch", "fit_saved_global_batch", "world_sizes_for"]

log = logging.getLogger("mtlora_dist")


@dataclass(frozen=True)
class SavedBatch:
    """Where the newest checkpoint's training data stood, and with which global batch."""

    url: str
    step: int
    world_size: int
    global_batch: int
    epoch: int
    batches_consumed: int  # global batches of ``epoch`` already trained


def saved_batch(cfg: TrainConfig) -> SavedBatch | None:
    """The newest complete checkpoint's data position (rank 0 reads, every rank gets it); ``None`` for a
    fresh run or a checkpoint without one (an import of an official checkpoint)."""
    found: SavedBatch | str | None = None
    if comm.rank() == 0:
        try:
            found = _read_saved_batch(cfg)
        except Exception as err:  # noqa: BLE001 - every rank raises it below (none left waiting)
            found = f"reading the newest checkpoint under {cfg.run_dir} failed: {type(err).__name__}: {err}"
    found = comm.broadcast_object(found)
    if isinstance(found, str):
        raise CheckpointError(found)
    return found


def _read_saved_batch(cfg: TrainConfig) -> SavedBatch | None:
    store = CheckpointStore(join(cfg.run_dir, "checkpoints"), cfg.data.storage)
    newest = store.newest_complete()
    if newest is None:
        return None
    tag, marker = newest
    data = json.loads(store.read(tag, STATE, marker))["per_rank"][0].get("data")
    if not data or "global_batch" not in data:
        return None
    return SavedBatch(store.url(tag), int(marker["step"]), int(marker["world_size"]), int(data["global_batch"]),
                      int(data["epoch"]), int(data["batches_consumed"]))  # fmt: skip


def world_sizes_for(global_batch: int, micro_batch: int, limit: int = 1024) -> list[int]:
    """World sizes on which ``micro_batch`` x some accumulation x ranks makes ``global_batch``."""
    if global_batch % micro_batch:
        return []
    per_micro = global_batch // micro_batch
    return [w for w in range(1, min(per_micro, limit) + 1) if per_micro % w == 0]


def fit_saved_global_batch(cfg: TrainConfig, world_size: int, saved: SavedBatch | None) -> None:
    """Keep the checkpoint's global batch on this world size: set ``cfg``'s gradient accumulation to the
    one that makes it with this micro-batch (one line when it changes); where none can, refuse (exit 2)
    unless ``checkpoint.change_global_batch`` says to continue with this run's global batch."""
    if saved is None:
        return
    micro, accumulation = cfg.data.batch_size, cfg.deepspeed.gradient_accumulation_steps
    now = micro * accumulation * world_size
    if now == saved.global_batch or cfg.checkpoint.change_global_batch:
        if now != saved.global_batch:
            log.info(
                "global batch %d -> %d (checkpoint.change_global_batch=true): micro-batch %d x accumulation %d x "
                "%d rank(s); learning rates follow optim.lr_scaling=%s",
                saved.global_batch, now, micro, accumulation, world_size, cfg.optim.lr_scaling,
            )  # fmt: skip
        return
    if saved.global_batch % (micro * world_size) == 0:
        keep = saved.global_batch // (micro * world_size)
        log.info(
            "resuming %s (saved on %d rank(s)) on %d: gradient accumulation %d -> %d keeps the global batch %d "
            "(micro-batch %d x %d x %d ranks)",
            saved.url, saved.world_size, world_size, accumulation, keep, saved.global_batch, micro, keep, world_size,
        )  # fmt: skip
        cfg.deepspeed.gradient_accumulation_steps = keep
        return
    sizes = world_sizes_for(saved.global_batch, micro)
    raise CheckpointError(
        f"cannot resume {saved.url} (step {saved.step}, global batch {saved.global_batch}) on {world_size} ranks: "
        f"micro-batch {micro} x accumulation x {world_size} ranks cannot make {saved.global_batch}; world sizes "
        f"that can: {', '.join(map(str, sizes)) or f'none with data.batch_size={micro}'}; to continue with global "
        f"batch {now} instead, pass checkpoint.change_global_batch=true"
    )


class DataPosition:
    """The training loader's position, in global batches. The order of an epoch depends on the global
    batch, not on the number of ranks, so a resume on another world size with the same global batch
    (micro-batch x accumulation x ranks) continues mid-epoch exactly; with another global batch
    (``checkpoint.change_global_batch``) the rest of the epoch is read once, in batches of the new size."""

    def __init__(self, loader, change_global_batch: bool = False) -> None:
        self.loader, self.change_global_batch = loader, change_global_batch

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any], same_world: bool) -> None:
        self.loader.load_state_dict(state, strict=same_world, new_global_batch=self.change_global_batch)
        if not same_world:
            log.info(
                "resumed on %d ranks from a checkpoint of %s ranks: data continues at epoch %d, global batch %d",
                comm.world_size(),
                state.get("world_size", "another number of"),
                self.loader.epoch,
                self.loader.batches_consumed // max(1, self.loader.geometry.accumulation),
            )


class RNGState:
    """Python, numpy and torch RNG states; on another number of ranks, a fresh per-rank seed."""

    def __init__(self, seed: int, engine) -> None:
        self.seed, self.engine = seed, engine

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any], same_world: bool) -> None:
        if same_world:
            set_rng_state(state)
        else:
            seed_everything(self.seed + comm.rank() + 7919 * int(self.engine.global_steps))
