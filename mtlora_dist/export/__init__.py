"""Exported models for inference: fold adapters into dense weights, save, load, predict.

    from mtlora_dist.export import load, predict
    model = load("exports/swin_t_r64")              # no DeepSpeed, no training config needed
    maps = predict(model, pil_or_uint8_array)        # {task: numpy map at the image's size}

Writing an export from a training checkpoint is ``launch/export.py`` (``mtlora_dist.export.from_checkpoint``,
which needs the training engine and is therefore not imported here).
"""

from mtlora_dist.export.artifact import InferenceModel, ModelSpec, load, save
from mtlora_dist.export.merge import MergeSummary, StackedLinear, to_inference
from mtlora_dist.export.predict import decode, predict

__all__ = [
    "InferenceModel",
    "MergeSummary",
    "ModelSpec",
    "StackedLinear",
    "decode",
    "load",
    "predict",
    "save",
    "to_inference",
]
