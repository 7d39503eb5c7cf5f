"""The evaluation job: checkpoint -> model -> distributed evaluation -> table, JSON, Markdown, PNGs.

Runs under plain ``python`` (one process), the deepspeed launcher, torchrun or srun: every rank rebuilds the
model from the checkpoint (no DeepSpeed engine, no optimizer state), evaluates its share of the split
(``engine.data_setup.make_loader``: the run's whole ``data`` config, read settings included), and the metric states are all-reduced by the evaluator. With
the training run's ``eval_batch_size``, protocol and number of ranks the numbers are the training run's
evaluation at that step, bit for bit; another number of ranks changes only the float summation order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from mtlora_dist import comm
from mtlora_dist.config import TrainConfig
from mtlora_dist.engine.console import setup_logging
from mtlora_dist.engine.data_setup import batch_geometry, data_world, make_loader, prepare_data
from mtlora_dist.engine.deepspeed_setup import model_dtype
from mtlora_dist.engine.distributed import init_distributed
from mtlora_dist.engine.evaluate import evaluate
from mtlora_dist.engine.restore import CheckpointRef, resolve_checkpoint, restore_model
from mtlora_dist.engine.threads import set_thread_count
from mtlora_dist.reports.curves import save_curves
from mtlora_dist.reports.predictions import PredictionReport
from mtlora_dist.reports.tables import write_results
from mtlora_dist.storage.fs import join
from mtlora_dist.tasks.evaluation import MultiTaskEvaluator

__all__ = ["EvalOutcome", "SPLITS", "evaluate_checkpoint"]

log = logging.getLogger("mtlora_dist")

SPLITS = ("val", "train")


@dataclass
class EvalOutcome:
    step: int
    results: dict[str, Any]  # the evaluator's results (all ranks)
    report: dict[str, Any]  # the JSON report (all ranks)
    files: dict[str, str] = field(default_factory=dict)  # what rank 0 wrote


def evaluate_checkpoint(
    cfg: TrainConfig, checkpoint: str, *, out_dir: str | None = None, split: str = "val", local_rank: int | None = None
) -> EvalOutcome:
    """Evaluate ``checkpoint`` (a run directory: its newest complete checkpoint; or ``checkpoints/step_X``)
    on ``split`` of ``cfg.data``. Rank 0 prints the table and writes ``<tag>_<split>_<protocol>.{json,md}``,
    the training curves and the prediction grid to ``out_dir`` (default ``<run_dir>/eval``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got '{split}'")
    info = init_distributed(
        local_rank, timeout_s=cfg.deepspeed.process_group_timeout_s, backend=cfg.deepspeed.dist_backend
    )
    setup_logging(info.rank)
    storage = cfg.data.storage
    ref: CheckpointRef = comm.broadcast_object(resolve_checkpoint(checkpoint, storage) if info.is_main else None)
    urls = dict(zip(("train", "val"), prepare_data(cfg.data, info)))
    dtype = model_dtype(cfg.deepspeed)
    model = restore_model(cfg, ref, storage, dtype=dtype).to(info.device)

    data = cfg.data
    world = data_world(info, set_thread_count(data.num_workers, announce=info.is_main).workers)
    loader = make_loader(cfg, urls[split], "val", world, batch_geometry(cfg, info.world_size))
    evaluator = MultiTaskEvaluator(data.tasks, data.dataset, baselines=cfg.eval.baselines, protocol=data.eval_protocol)
    results = evaluate(model, loader, evaluator, info.device, dtype, cfg.eval.max_batches)
    report = {
        "checkpoint": ref.url,
        "step": ref.step,
        "split": split,
        "world_size": info.world_size,
        "eval_batch_size": data.eval_batch_size,
        **evaluator.to_json(results),
    }

    out_dir = out_dir or join(ref.run_dir, "eval")
    grid = PredictionReport.from_config(cfg, urls["val"])
    grid_url = grid.write(model, ref.step, out_dir, info.device, dtype) if grid is not None else None
    outcome = EvalOutcome(ref.step, results, report)
    if info.is_main:
        log.info(
            "evaluation of %s (step %d) on the %s split, %d rank(s)\n%s",
            ref.url,
            ref.step,
            split,
            info.world_size,
            evaluator.table(results),
        )
        outcome.files = write_results(report, out_dir, f"{ref.tag}_{split}_{data.eval_protocol}", storage)
        curves = save_curves(join(ref.run_dir, "metrics.jsonl"), join(out_dir, "curves.png"), storage)
        if curves:
            outcome.files["curves"] = join(out_dir, "curves.png")
        if grid_url:
            outcome.files["predictions"] = grid_url
        log.info("wrote %s", ", ".join(outcome.files.values()))
    comm.shutdown()
    return outcome
