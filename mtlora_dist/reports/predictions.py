"""The visual report: a model's predictions on a few fixed validation images as one PNG grid.

One row per image: the input, then for every task its ground truth and the prediction
(``reports/colorize.py`` draws each by the task's target kind). The images are the first
``num_samples`` of the validation split in file order, with labels resized to the input size (the
official protocol) so every panel of a row shows the same field of view. They are read once per run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mtlora_dist import comm
from mtlora_dist.config import EvalProtocol, TrainConfig
from mtlora_dist.data.config import BatchGeometry, DataWorld
from mtlora_dist.engine.data_setup import make_loader
from mtlora_dist.engine.evaluate import to_device
from mtlora_dist.export.predict import decode
from mtlora_dist.reports.colorize import colorize, label_map
from mtlora_dist.reports.files import save_png
from mtlora_dist.reports.grid import GridLayout, compose_grid, panel_size
from mtlora_dist.storage.fs import join
from mtlora_dist.tasks.registry import get_task

__all__ = ["PredictionReport"]


class PredictionReport:
    """Draws ``<out_dir>/predictions_step_XXXXXXXX.png`` for a model (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, url: str) -> None:
        self.url, self.num_samples = url, cfg.eval.visual_samples
        # the run's config, its evaluation loader set to one batch of these images, labels at the input size
        data = replace(cfg.data, eval_batch_size=self.num_samples, eval_protocol=EvalProtocol.official)
        self.cfg = replace(cfg, data=data)
        self.tasks, self.storage = list(data.tasks), data.storage
        self.img_size = (int(cfg.model.img_size[0]), int(cfg.model.img_size[1]))
        self._samples: dict | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig, url: str) -> PredictionReport | None:
        """From a ``TrainConfig``; ``None`` when ``eval.visual_samples`` is 0."""
        if cfg.eval.visual_samples <= 0:
            return None
        return cls(cfg, url)

    def samples(self) -> dict:
        """The fixed images and labels (a batch, on the CPU), read on first use."""
        if self._samples is None:
            with _quiet("mtlora_dist"):  # the evaluation's own loader has said what a val loader is
                loader = self._loader()
            batches = iter(loader)
            try:
                batch = next(batches)
            finally:
                batches.close()
            keep = batch["valid"]
            self._samples = {k: v[keep] for k, v in batch.items() if isinstance(v, Tensor)}
        return self._samples

    def _loader(self):
        """A one-batch loader of the first ``num_samples`` validation images (always the same ones), read
        with the run's data settings, in this process alone."""
        return make_loader(self.cfg, self.url, "val", DataWorld(), BatchGeometry(self.cfg.data.batch_size))

    @torch.no_grad()
    def predict(self, model, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """Logits of ``model`` (a module or a DeepSpeed engine) on the fixed images, in eval mode."""
        module = model.module if hasattr(model, "module") else model
        was_training = module.training
        module.eval()
        try:
            batch = to_device(self.samples(), device, dtype)
            return {t: p.float().cpu() for t, p in model(batch["image"]).items()}
        finally:
            module.train(was_training)

    def render(self, logits: dict[str, Tensor]) -> Image.Image:
        """The grid: (1 + 2 x tasks) columns, one row per image."""
        samples = self.samples()
        rows = []
        for i, image in enumerate(samples["image"]):
            row = [image.permute(1, 2, 0).numpy()]
            for task in self.tasks:
                truth, ignore = label_map(task, samples[task][i].numpy())
                value_range = _value_range(truth, ignore)
                prediction = decode(task, logits[task][i])
                row += [colorize(task, truth, ignore, value_range), colorize(task, prediction, value_range=value_range)]
            rows.append(row)
        titles = ["input"] + [f"{task} {which}" for task in self.tasks for which in ("truth", "pred")]
        nearest = [False] + [get_task(t).target_kind == "class_map" for t in self.tasks for _ in range(2)]
        layout = GridLayout(len(rows), len(titles), *panel_size(self.img_size))
        return compose_grid(rows, titles, layout, nearest)

    def write(
        self, model, step: int, out_dir: str, device: torch.device, dtype: torch.dtype, logger=None
    ) -> str | None:
        """Call on every rank: all run the forward (under ZeRO-3 it gathers weights collectively); rank 0
        draws, writes ``<out_dir>/predictions_step_XXXXXXXX.png`` and logs it to wandb through ``logger``.
        Returns the PNG's URL on rank 0."""
        logits = self.predict(model, device, dtype)
        if comm.rank() != 0:
            return None
        url = join(out_dir, f"predictions_step_{step:08d}.png")
        local = save_png(self.render(logits), url, self.storage)
        if logger is not None:
            logger.log_image("predictions", local, step)
        return url


def _value_range(values: np.ndarray, ignore: np.ndarray) -> tuple[float, float] | None:
    """Range of the valid truth values: one colour scale for truth and prediction (used by depth)."""
    valid = values[~ignore]
    return (float(valid.min()), float(valid.max())) if valid.size else None


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Info lines of logger ``name`` off while inside (warnings still show)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(before, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(before)
