"""Checkpoints of the trainable state: a format (safetensors + JSON, nothing unpickled), a store
(local or S3, marker written last, background upload) and a manager that owns what is saved and when."""

from mtlora_dist.checkpoint.format import (
    CheckpointError,
    CheckpointMismatchError,
    ChecksumMismatchError,
    frozen_fingerprint,
    step_tag,
)
from mtlora_dist.checkpoint.manager import Checkpointer, SavePolicy, Stateful
from mtlora_dist.checkpoint.storage import CheckpointStore

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "CheckpointMismatchError",
    "ChecksumMismatchError",
    "CheckpointStore",
    "SavePolicy",
    "Stateful",
    "frozen_fingerprint",
    "step_tag",
]
