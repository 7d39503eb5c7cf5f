"""The training job: build config -> data -> model -> DeepSpeed engine -> loop.

Reads top to bottom like torchtitan's ``train.py``; every stateful piece (engine, data position,
RNG, wandb run) goes through the :class:`Checkpointer`, so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import torch

from mtlora_dist import comm
from mtlora_dist.checkpoint import Checkpointer, CheckpointMismatchError, SavePolicy
from mtlora_dist.checkpoint.format import step_tag
from mtlora_dist.config import TrainConfig, to_yaml
from mtlora_dist.data.config import DataWorld
from mtlora_dist.engine.console import Progress, format_eta, setup_logging
from mtlora_dist.engine.data_setup import batch_geometry, data_world, make_loader, prepare_data
from mtlora_dist.engine.deepspeed_setup import initialize_engine, model_dtype, resolve_precision
from mtlora_dist.engine.distributed import DistInfo, init_distributed
from mtlora_dist.engine.evaluate import ReportsFactory, Validation, to_device
from mtlora_dist.engine.fingerprint import run_fingerprint
from mtlora_dist.engine.rng import seed_everything
from mtlora_dist.engine.run_logger import RunLogger
from mtlora_dist.engine.signals import TerminationFlag
from mtlora_dist.engine.threads import set_thread_count
from mtlora_dist.engine.train_state import DataPosition, RNGState, fit_saved_global_batch, saved_batch
from mtlora_dist.models import build_model
from mtlora_dist.models.compile import compile_model
from mtlora_dist.models.sync_bn import convert_sync_batchnorm
from mtlora_dist.storage.atomic import atomic_write_text
from mtlora_dist.storage.fs import is_remote, join, url_to_fs
from mtlora_dist.tasks.balancing import Balancer, BalancerMismatchError, build_balancer
from mtlora_dist.tasks.evaluation import MultiTaskEvaluator
from mtlora_dist.tasks.losses import MultiTaskLoss
from mtlora_dist.tasks.registry import loss_weights

__all__ = ["train", "EXIT_PREEMPTED", "TrainResult"]

# Exit status of launch/train.py after a signal-triggered checkpoint: "requeue me" (distinct from 0 =
# finished and 1 = a real error, which must not be requeued).
EXIT_PREEMPTED = 3

log = logging.getLogger("mtlora_dist")


@dataclass
class TrainResult:
    step: int
    total_steps: int
    preempted: bool  # stopped by a signal after writing a checkpoint
    results: dict  # the last evaluation


def train(cfg: TrainConfig, local_rank: int | None = None, reports: ReportsFactory | None = None) -> TrainResult:
    """Run (or resume) the job described by ``cfg``; ``reports(cfg, val_url)`` makes what is drawn after
    each evaluation and at the end (``reports.TrainingReporter``). Raises ``comm.PeerLostError`` when
    another rank of the job dies, so this rank stops at once instead of waiting for its launcher's kill."""
    info = init_distributed(
        local_rank, timeout_s=cfg.deepspeed.process_group_timeout_s, backend=cfg.deepspeed.dist_backend
    )
    stop = TerminationFlag(announce=info.is_main)  # early: a stop during set-up is handled at the first step
    setup_logging(info.rank)
    budget = set_thread_count(cfg.data.num_workers, announce=info.is_main)
    comm.barrier()
    with comm.peer_loss_as_error():
        result = _run(cfg, info, stop, reports, data_world(info, budget.workers))
    comm.shutdown()
    return result


def _run(
    cfg: TrainConfig, info: DistInfo, stop: TerminationFlag, reports: ReportsFactory | None, world: DataWorld
) -> TrainResult:
    started = time.perf_counter()  # for the closing line's total time
    # 'auto' becomes this device's precision, and the run's config.yaml records it for eval and export
    cfg.deepspeed.precision = resolve_precision(cfg.deepspeed.precision, info.device)
    train_url, val_url = prepare_data(cfg.data, info)
    if cfg.checkpoint.resume:  # before the engine: the accumulation that keeps the saved global batch
        fit_saved_global_batch(cfg, info.world_size, saved_batch(cfg))

    seed_everything(cfg.seed)  # same initial weights on every rank
    model = _build_model(cfg, info)
    seed_everything(cfg.seed + info.rank)  # then per-rank dropout and drop-path
    geometry = batch_geometry(cfg, info.world_size)  # the one global batch: engine, plan and loader read it
    train_loader = make_loader(cfg, train_url, "train", world, geometry)
    val_loader = make_loader(cfg, val_url, "val", world, geometry)
    steps_per_epoch = max(1, len(train_loader) // geometry.accumulation)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    engine = initialize_engine(model, cfg.optim, cfg.deepspeed, geometry, total_steps, steps_per_epoch)

    logger = RunLogger(
        cfg.run_dir,
        enabled=info.is_main,
        storage=cfg.data.storage,
        wandb_cfg=cfg.logging.wandb,
        config=asdict(cfg),
        start=False,
    )
    checkpointer = Checkpointer(
        cfg.run_dir,
        engine,
        policy=SavePolicy(cfg.checkpoint.every, cfg.checkpoint.keep_last),
        fingerprint=run_fingerprint(cfg),
        storage=cfg.data.storage,
        local_cache=cfg.checkpoint.local_cache,
    )
    checkpointer.register("data", DataPosition(train_loader, cfg.checkpoint.change_global_batch), per_rank=True)
    checkpointer.register("rng", RNGState(cfg.seed, engine), per_rank=True)
    checkpointer.register("run_log", logger, per_rank=False)
    loss_fn = _build_loss(cfg, engine, steps_per_epoch, info)
    checkpointer.register("loss_balancer", _BalancerPiece(loss_fn.balancer), per_rank=False)
    if cfg.checkpoint.resume and checkpointer.resume() is not None:
        log.info("resumed from step %d", engine.global_steps)
        stop.saved(engine.global_steps, checkpointer.store.url(step_tag(engine.global_steps)))
    else:
        logger.start_over()  # rows of an attempt killed before its first complete checkpoint go
    if engine.global_steps >= total_steps:
        log.info(
            "%s is already complete (step %d of %d): nothing to train. To train longer, pass a larger "
            "max_steps (e.g. max_steps=%d); for a fresh run, pass another run_dir.",
            cfg.run_dir,
            engine.global_steps,
            total_steps,
            2 * total_steps,
        )
        return TrainResult(engine.global_steps, total_steps, False, {})
    logger.start()  # wandb continues the restored run id
    if info.is_main:
        atomic_write_text(join(cfg.run_dir, "config.yaml"), to_yaml(cfg), cfg.data.storage)
        log.info(
            "run_dir %s | %d rank(s) | %d steps | restart count %s",
            cfg.run_dir,
            info.world_size,
            total_steps,
            os.environ.get("SLURM_RESTART_COUNT", "0"),
        )

    dtype = model_dtype(cfg.deepspeed)
    evaluator = MultiTaskEvaluator(
        cfg.data.tasks, cfg.data.dataset, baselines=cfg.eval.baselines, protocol=cfg.data.eval_protocol
    )
    validation = Validation(
        val_loader,
        evaluator,
        logger,
        every=cfg.eval.every,
        max_batches=cfg.eval.max_batches,
        device=info.device,
        dtype=dtype,
        reports=reports(cfg, val_url) if reports else None,
    )
    batches = _endless(train_loader)
    results: dict = {}
    preempted = False
    uploading = None  # (step, URL) of the last checkpoint sent to object storage

    progress = Progress(total_steps, engine.global_steps, enabled=info.is_main, bar=cfg.logging.progress_bar)
    tick, samples, steps = time.perf_counter(), 0, 0
    job_end = engine.global_steps + cfg.steps_per_job if cfg.steps_per_job else total_steps
    with progress.routing_logs():
        while engine.global_steps < min(total_steps, job_end):
            losses = _train_step(engine, batches, loss_fn, info, dtype, geometry.accumulation)
            step = engine.global_steps
            samples += geometry.global_batch
            steps += 1
            progress.advance()
            if step % cfg.logging.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - tick
                _log_train(logger, progress, step, losses, engine, samples / elapsed, elapsed / steps, train_loader)
                tick, samples, steps = time.perf_counter(), 0, 0
            if validation.due(step, total_steps):
                with stop.doing("the evaluation"):
                    results = validation.run(engine, step)
            # every rank takes the same branch: the signal flag is all-reduced inside should_stop()
            stopping = (step == job_end < total_steps) or (step < total_steps and stop.should_stop())
            if checkpointer.should_save(step, final=step == total_steps, stopping=stopping):
                comm.broadcast_buffers(engine.module)  # the checkpoint holds rank 0's BatchNorm statistics
                url = checkpointer.save(step)
                logger.flush()
                log.info("checkpoint of step %d %s %s", step, "uploading to" if is_remote(url) else "written to", url)
                stop.saved(step, url, complete=not is_remote(url))
                uploading = (step, url) if is_remote(url) else None
            if stopping:
                preempted = step != job_end
                log.info(
                    "stopping at step %d (%s) with a checkpoint; every rank exits with status %d; resume by "
                    "running the same command",
                    step,
                    "steps_per_job reached" if step == job_end else stop.name,
                    EXIT_PREEMPTED if step != job_end else 0,
                )
                break
    progress.close()
    checkpointer.wait()  # a background upload to object storage must land before the job ends
    if uploading:
        stop.saved(*uploading)  # the upload has landed: the stop's checkpoint is complete
    validation.finish(engine.global_steps)
    logger.close()
    if info.is_main:
        log.info(
            "%s", _closing_line(cfg, checkpointer, engine.global_steps, total_steps, time.perf_counter() - started)
        )
    return TrainResult(engine.global_steps, total_steps, preempted, results)


def _closing_line(cfg: TrainConfig, checkpointer: Checkpointer, step: int, total: int, elapsed: float) -> str:
    """The run's last line: where its outputs are and how long it took (after the wandb sync hint)."""
    newest = checkpointer.latest()
    outputs = [f"checkpoint {join(cfg.run_dir, 'checkpoints', newest)}" if newest else "no checkpoint"]
    outputs += [join(cfg.run_dir, name) for name in ("metrics.jsonl", "config.yaml")]
    fs, reports = url_to_fs(join(cfg.run_dir, "reports"), cfg.data.storage)
    if fs.exists(reports):
        outputs.append(join(cfg.run_dir, "reports") + "/ (curves, predictions)")
    where = f"step {step} of {total} in {format_eta(elapsed)}"
    return f"{'done' if step >= total else 'stopped'}: {where}; outputs: {', '.join(outputs)}"


# --------------------------------------------------------------------------------------------------
def _train_step(engine, batches, loss_fn, info: DistInfo, dtype, accumulation: int) -> dict[str, torch.Tensor]:
    """One optimizer step over ``accumulation`` micro-batches; returns mean per-task losses as tensors
    on the device. Reading one is a host sync, so only log steps read them (``_host_values``)."""
    sums: dict[str, torch.Tensor] = {}
    for _ in range(accumulation):
        batch = to_device(next(batches), info.device, dtype)
        outputs = engine(batch["image"])
        total, per_task = loss_fn({t: o.float() for t, o in outputs.items()}, batch)
        engine.backward(total)
        engine.step()
        weights = {f"{_WEIGHT}{t}": w for t, w in loss_fn.weights_used().items()}
        for name, value in {"loss": total.detach(), **per_task, **weights}.items():
            share = value / accumulation
            sums[name] = sums[name] + share if name in sums else share
    loss_fn.end_step()  # the balancer's update, on every rank after the optimizer step
    return sums


_WEIGHT = "weight/"  # prefix of the task weights among _train_step's values


def _build_loss(cfg: TrainConfig, engine, steps_per_epoch: int, info: DistInfo) -> MultiTaskLoss:
    """The per-task losses and their balancer (``loss.balancing``) over the fixed weights."""
    weights = loss_weights(cfg.data.tasks, cfg.loss_weights)
    balancer = build_balancer(
        cfg.loss,
        cfg.data.tasks,
        weights,
        steps_per_epoch=steps_per_epoch,
        device=info.device,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
    )
    balancer.attach(engine)
    return MultiTaskLoss(cfg.data.tasks, weights, balancer)


class _BalancerPiece:
    """The balancer as a checkpoint piece; a checkpoint of another method is a configuration mismatch."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer

    def state_dict(self) -> dict:
        return self.balancer.state_dict()

    def load_state_dict(self, state: dict, same_world: bool) -> None:
        try:
            self.balancer.load_state_dict(state, same_world)
        except BalancerMismatchError as err:
            raise CheckpointMismatchError(str(err)) from None


def _global_means(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The step's losses averaged over the ranks: the global batch's mean, what a run of one rank with the
    same global batch logs (one all-reduce per logged step, on every rank). The task weights are the same
    on every rank and stay as they are."""
    names = [k for k in values if not k.startswith(_WEIGHT)]
    if comm.world_size() == 1 or not names:
        return values
    means = comm.all_reduce(torch.stack([values[k].float().reshape(()) for k in names])) / comm.world_size()
    return {**values, **dict(zip(names, means.unbind()))}


def _host_values(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """All losses to Python floats in one device-to-host copy."""
    values = torch.stack([v.float().reshape(()) for v in losses.values()]).tolist()
    return dict(zip(losses, values))


def _peak_memory_mb(device: torch.device) -> float:
    """The most memory this rank has held so far: the accelerator's allocator peak, else the process's
    peak resident set (what the comparison report shows as peak memory)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _endless(loader):
    """Batches across epochs; the loader keeps its own (epoch, position) for checkpoints and moves to
    the next epoch by itself when iterated again."""
    while True:
        yield from loader


def _build_model(cfg: TrainConfig, info: DistInfo):
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    if cfg.model.sync_bn and info.world_size > 1:  # the same SyncBN on CPUs (gloo) and GPUs (NCCL)
        model = convert_sync_batchnorm(model)
    return compile_model(model.to(info.device), cfg.model.compile)


def _log_train(
    logger: RunLogger,
    progress: Progress,
    step: int,
    losses: dict[str, torch.Tensor],
    engine,
    rate: float,
    step_s: float,
    loader,
) -> None:
    losses = _host_values(_global_means(losses))
    lr = engine.get_lr()[0]
    data_stats = comm.sum_counts(loader.stats)  # collective: skipped/corrupt samples of every rank
    progress.report(step, losses["loss"], lr, rate)
    record = {
        "step": step,
        "split": "train",
        "loss": losses["loss"],
        "lr": lr,
        "samples_per_s": rate,
        "step_s": step_s,  # wall seconds per optimizer step since the last record
        "peak_memory_mb": _peak_memory_mb(engine.device),
        "losses": {k: v for k, v in losses.items() if k != "loss" and not k.startswith(_WEIGHT)},
        "loss_weights": {k[len(_WEIGHT) :]: v for k, v in losses.items() if k.startswith(_WEIGHT)},
        "data": data_stats,
    }
    logger.log(record)
