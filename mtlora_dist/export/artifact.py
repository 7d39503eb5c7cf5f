"""The exported model on disk: merged weights as safetensors plus what it takes to rebuild the model.

    <dir>/model.safetensors   every tensor of the inference model (names as in the training model; folded
                              layers keep timm's names), no pickle
    <dir>/export.json         format, model/adapter config, tasks, dataset, input size, what was folded,
                              where it came from, the weights' sha256, the export's own output check

Loading builds the architecture from ``export.json`` (random init, no pretrained file), applies the same
folding to get the same structure, then loads the weights strictly. Nothing here imports DeepSpeed,
Hydra or the training engine, so an inference service needs torch, timm, safetensors and this package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from mtlora_dist.adapters.inject import AdapterConfig
from mtlora_dist.export.merge import MergeSummary, to_inference
from mtlora_dist.models import ModelConfig, MultiTaskSwin, build_model
from mtlora_dist.models.trainable import TrainableConfig
from mtlora_dist.storage.atomic import atomic_write
from mtlora_dist.tasks.registry import DatasetSpec, TaskSpec, get_dataset, get_task, register_dataset

__all__ = ["FORMAT", "InferenceModel", "ModelSpec", "load", "save"]

FORMAT = "mtlora-dist-export/1"
WEIGHTS = "model.safetensors"
MANIFEST = "export.json"


@dataclass
class ModelSpec:
    """Everything ``build_model`` needs, as plain data (``model.pretrained`` is dropped: the export holds
    the frozen weights)."""

    model: ModelConfig
    adapter: AdapterConfig
    trainable: TrainableConfig
    tasks: list[str]
    dataset: str

    def build(self) -> MultiTaskSwin:
        model = dataclasses.replace(self.model, pretrained=None)
        return build_model(model, self.adapter, self.trainable, self.tasks, self.dataset)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"]["pretrained"] = None
        # the dataset's and tasks' registry entries: a declared dataset's model rebuilds without its config
        out["registry"] = {
            "dataset": get_dataset(self.dataset).to_dict(),
            "tasks": [
                {**dataclasses.asdict(get_task(t)), "loss_kwargs": dict(get_task(t).loss_kwargs)} for t in self.tasks
            ],
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if "registry" in data:
            entries = data["registry"]
            register_dataset(DatasetSpec.from_dict(entries["dataset"]), [TaskSpec(**t) for t in entries["tasks"]])
        return cls(
            ModelConfig(**data["model"]),
            AdapterConfig(**data["adapter"]),
            TrainableConfig(**data["trainable"]),
            list(data["tasks"]),
            str(data["dataset"]),
        )


class InferenceModel(nn.Module):
    """A folded :class:`MultiTaskSwin` with its spec: images (B, 3, H, W) normalised -> {task: logits}.
    ``predict`` (``mtlora_dist.export.predict``) adds the image pre- and post-processing."""

    def __init__(self, net: MultiTaskSwin, spec: ModelSpec, summary: MergeSummary) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.summary = summary

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.spec.tasks)

    @property
    def img_size(self) -> tuple[int, int]:
        return int(self.spec.model.img_size[0]), int(self.spec.model.img_size[1])

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.net(images)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(
    net: MultiTaskSwin, spec: ModelSpec, summary: MergeSummary, out_dir: str, extra: dict[str, Any] | None = None
) -> str:
    """Write the folded ``net`` (from :func:`to_inference`) to the local folder ``out_dir``; ``extra``
    (provenance, checks) goes into ``export.json``. The manifest is written last."""
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, WEIGHTS)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    atomic_write(weights, safetensors.torch.save(state, metadata={"format": FORMAT}))
    manifest = {
        "format": FORMAT,
        "spec": spec.to_dict(),
        "merge": dataclasses.asdict(summary),
        "files": {WEIGHTS: {"size": os.path.getsize(weights), "sha256": _sha256(weights)}},
        "num_parameters": sum(v.numel() for v in state.values()),
        **(extra or {}),
    }
    path = os.path.join(out_dir, MANIFEST)
    atomic_write(path, json.dumps(manifest, indent=1).encode())
    return out_dir


def load(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> InferenceModel:
    """The exported model in ``path`` (a local folder), in eval mode on ``device``."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"{path} has no {MANIFEST}: not an exported model (launch/export.py writes one)")
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path} has format {manifest.get('format')!r}; this version reads {FORMAT!r}")
    weights = os.path.join(path, WEIGHTS)
    expected = manifest["files"][WEIGHTS]["sha256"]
    if _sha256(weights) != expected:
        raise ValueError(f"{weights} does not match the sha256 in {MANIFEST}: the file changed after export")
    spec = ModelSpec.from_dict(manifest["spec"])
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's RNG alone
        net = spec.build()
    summary = to_inference(net, fold_task_proj=bool(manifest["merge"]["fold_task_proj"]))
    _load_strict(net, load_file(weights), weights)
    return InferenceModel(net, spec, summary).to(device=device, dtype=dtype).eval()


def _load_strict(net: nn.Module, state: dict[str, Tensor], where: str) -> None:
    own = net.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own.keys() & state.keys()
        if own[k].shape != state[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{where} does not fit the model described by its {MANIFEST}: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, shape mismatches {mismatched[:8]}"
        )
    net.load_state_dict(state, strict=True)
