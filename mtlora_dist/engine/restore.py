"""Rebuild a trained model from a checkpoint, for evaluation and export (no optimizer, no DeepSpeed engine).

A checkpoint holds the trainable state only (``trainable.safetensors``: fp32 ``param/<name>`` and
``buffer/<name>`` such as BatchNorm statistics); the frozen backbone is rebuilt exactly as the trainer
built it: ``seed_everything(cfg.seed)`` then ``build_model`` (random init, or ``model.pretrained``).
Three checks make a wrong rebuild an error instead of wrong numbers:

- the run's config fingerprint (backbone, tasks, dataset, adapter mode) and every trainable parameter's
  name and shape, from the checkpoint's marker;
- the sha256 of every file read, from the marker (safetensors and JSON only: nothing is unpickled);
- the frozen-weights fingerprint in the marker (same pretrained file, same seed).

Checkpoints of every ZeRO stage and world size load the same way.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtlora_dist.checkpoint import format as ckpt
from mtlora_dist.checkpoint.storage import CheckpointStore
from mtlora_dist.config import TrainConfig
from mtlora_dist.engine.fingerprint import run_fingerprint
from mtlora_dist.engine.rng import seed_everything
from mtlora_dist.models import MultiTaskSwin, build_model
from mtlora_dist.models.precision import align_buffers
from mtlora_dist.storage.fs import StorageOptions, join, url_to_fs

__all__ = ["CheckpointRef", "resolve_checkpoint", "restore_model"]

log = logging.getLogger("mtlora_dist")

CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class CheckpointRef:
    """One complete checkpoint: the run it belongs to, its tag and its completion marker."""

    run_dir: str
    tag: str
    marker: dict[str, Any]

    @property
    def url(self) -> str:
        return join(self.run_dir, CHECKPOINTS_DIR, self.tag)

    @property
    def step(self) -> int:
        return int(self.marker["step"])


def resolve_checkpoint(url: str, storage: StorageOptions | None = None) -> CheckpointRef:
    """``url`` is a run directory (its newest complete checkpoint is taken), its ``checkpoints/`` folder,
    or one ``checkpoints/step_XXXXXXXX`` folder (which must be complete)."""
    url = str(url).rstrip("/")
    fs, path = url_to_fs(url, storage)
    fs.invalidate_cache()
    if fs.exists(f"{path}/{ckpt.MARKER}"):
        parent, tag = posixpath.split(url)
        if posixpath.basename(parent) != CHECKPOINTS_DIR:
            raise ckpt.CheckpointError(
                f"{url} holds a checkpoint marker but is not inside a '{CHECKPOINTS_DIR}/' folder "
                "of a run directory; pass the run directory or <run_dir>/checkpoints/step_X"
            )
        marker = CheckpointStore(parent, storage).marker(tag)
        if marker is None:
            raise ckpt.CheckpointError(
                f"{url} is not a complete checkpoint: its {ckpt.MARKER} is unreadable or lists "
                "files that are missing or of another size"
            )
        return CheckpointRef(posixpath.dirname(parent), tag, marker)
    run_dir = posixpath.dirname(url) if posixpath.basename(url) == CHECKPOINTS_DIR else url
    found = CheckpointStore(join(run_dir, CHECKPOINTS_DIR), storage).newest_complete()
    if found is None:
        raise ckpt.CheckpointError(
            f"no complete checkpoint under {run_dir}/{CHECKPOINTS_DIR} (a checkpoint counts once "
            f"its {ckpt.MARKER} is written); pass a run directory or a checkpoints/step_X folder"
        )
    return CheckpointRef(run_dir, *found)


def _check_matches(ref: CheckpointRef, cfg: TrainConfig, model: nn.Module) -> None:
    current = {"config": ckpt.normalize(run_fingerprint(cfg)), "trainable": ckpt.trainable_shapes(model)}
    problems = ckpt.fingerprint_differences(ref.marker.get("fingerprint", {}), current)
    if problems:
        raise ckpt.CheckpointMismatchError(
            f"checkpoint {ref.url} was trained with another model or configuration:\n  "
            + "\n  ".join(problems)
            + "\nUse the run's own config (omit --config to read <run_dir>/config.yaml) or the matching --config."
        )


def restore_model(
    cfg: TrainConfig, ref: CheckpointRef, storage: StorageOptions | None = None, dtype: torch.dtype = torch.float32
) -> MultiTaskSwin:
    """The model of ``ref`` in eval mode on the CPU, its parameters in ``dtype`` (the training precision
    reproduces the training run's evaluation; the frozen fingerprint is taken in it, as the trainer took it)."""
    seed_everything(cfg.seed)  # the trainer builds right after this, so random frozen weights match too
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    for param in model.parameters():  # as DeepSpeed casts for bf16/fp16, then the buffers as training had them
        param.data = param.data.to(dtype)
    align_buffers(model, dtype)
    _check_matches(ref, cfg, model)
    frozen = ref.marker.get("frozen")
    if frozen and int(ref.marker.get("zero_stage", 0)) < 3 and frozen != ckpt.frozen_fingerprint(model):
        raise ckpt.CheckpointMismatchError(
            f"the frozen backbone rebuilt here differs from the one {ref.url} was trained on: use the same "
            f"model.pretrained file and seed as the training run (here: seed {cfg.seed}, "
            f"pretrained {cfg.model.pretrained!r})"
        )
    store = CheckpointStore(join(ref.run_dir, CHECKPOINTS_DIR), storage)
    tensors = ckpt.tensors_from_bytes(store.read(ref.tag, ckpt.TRAINABLE, ref.marker))
    problems = ckpt.tensor_problems(model, tensors)
    if problems:
        raise ckpt.CheckpointError(ckpt.describe_tensor_problems(problems, f"{ref.url}/{ckpt.TRAINABLE}"))
    weights = {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith(("param/", "buffer/"))}
    result = model.load_state_dict(weights, strict=False)
    trainable = set(ckpt.trainable_shapes(model))
    missing = sorted(trainable & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise ckpt.CheckpointMismatchError(
            f"{ref.url}/{ckpt.TRAINABLE} does not fit the model: missing trainable "
            f"{missing[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    log.info("restored %s (step %d) with %d tensors", ref.url, ref.step, len(weights))
    return model.eval()
