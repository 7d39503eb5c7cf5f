"""What a training run draws besides its metrics: the prediction grid after each evaluation
(``<run_dir>/reports/predictions_step_X.png``, also logged to wandb) and the training curves at the end.

The engine knows nothing of pictures: ``launch/train.py`` hands :meth:`TrainingReporter.from_config`
to the trainer, which calls it through the ``engine.evaluate.TrainingReports`` protocol.
"""

from __future__ import annotations

import torch

from mtlora_dist import comm
from mtlora_dist.config import TrainConfig
from mtlora_dist.engine.run_logger import RunLogger
from mtlora_dist.reports.curves import save_curves
from mtlora_dist.reports.predictions import PredictionReport
from mtlora_dist.storage.fs import StorageOptions, join

__all__ = ["TrainingReporter"]


class TrainingReporter:
    def __init__(self, run_dir: str, grid: PredictionReport | None, storage: StorageOptions | None = None) -> None:
        self.run_dir, self.grid, self.storage = run_dir, grid, storage

    @classmethod
    def from_config(cls, cfg: TrainConfig, val_url: str) -> TrainingReporter:
        return cls(cfg.run_dir, PredictionReport.from_config(cfg, val_url), cfg.data.storage)

    def after_evaluation(self, model, step: int, logger: RunLogger, device: torch.device, dtype: torch.dtype) -> None:
        if self.grid is not None:  # every rank runs the forward (ZeRO-3 gathers weights); rank 0 draws
            self.grid.write(model, step, join(self.run_dir, "reports"), device, dtype, logger)

    def at_end(self, logger: RunLogger, step: int) -> None:
        if comm.rank() == 0:
            curves = save_curves(logger.metrics_path, join(self.run_dir, "reports", "curves.png"), self.storage)
            if curves:
                logger.log_image("curves", curves, step)
