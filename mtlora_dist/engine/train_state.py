"""The trainer's per-rank pieces of a checkpoint: data position and RNG (see ``checkpoint.manager``)."""

from __future__ import annotations

import logging
from typing import Any

from mtlora_dist import comm
from mtlora_dist.engine.rng import rng_state, seed_everything, set_rng_state

__all__ = ["DataPosition", "RNGState"]

log = logging.getLogger("mtlora_dist")


class DataPosition:
    """The training loader's position, in global batches. The order of an epoch depends on the global
    batch, not on the number of ranks, so a resume on another world size with the same global batch
    (micro-batch x accumulation x ranks) continues mid-epoch exactly; with another global batch the
    loader continues at the next epoch boundary."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any], same_world: bool) -> None:
        self.loader.load_state_dict(state, strict=same_world)
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
