"""A tiny MTLoRA-shaped training run for the checkpoint tests, one process per rank.

Started by ``tests/checkpoint/test_resume.py`` with the ``deepspeed`` launcher or with plain
``RANK``/``WORLD_SIZE`` variables. It builds a frozen ``Linear(256, 256)`` "backbone" with a trainable
low-rank adapter and two trainable task heads, trains on data derived from ``(step, rank)`` only, saves
through :class:`~mtlora_dist.checkpoint.Checkpointer` every ``--save-every`` steps (with the RNG, a data
position and the run log registered as pieces) and resumes from ``--run-dir`` when it holds a checkpoint.
Rank 0 writes a JSON report (per-rank losses by step, where it started) and, on request, the full
(gathered) trainable and optimizer state.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402
from torch import nn  # noqa: E402

from mtlora_dist.checkpoint import Checkpointer, SavePolicy  # noqa: E402
from mtlora_dist.checkpoint import storage as checkpoint_storage  # noqa: E402
from mtlora_dist.engine.run_logger import RunLogger  # noqa: E402

TASKS = {"semseg": 8, "depth": 1}
MICRO_BATCH = 4
FINGERPRINT = {"model": "tiny-mtl", "tasks": sorted(TASKS), "lora_rank": 4}


class TinyMTL(nn.Module):
    """Frozen backbone + shared low-rank adapter + one head per task; dropout so RNG state matters."""

    def __init__(self, dim: int = 256, rank: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Linear(dim, dim).requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(dim, rank) * 0.05)
        self.lora_b = nn.Parameter(torch.randn(rank, dim) * 0.05)
        self.drop = nn.Dropout(0.1)
        self.heads = nn.ModuleDict({task: nn.Linear(dim, width) for task, width in TASKS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x) + (x @ self.lora_a) @ self.lora_b
        h = self.drop(F.gelu(h))
        return {task: head(h) for task, head in self.heads.items()}


def batch(step: int, rank: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Deterministic data: a function of (step, rank) only, like a resumable sharded loader."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(MICRO_BATCH, 256, generator=gen)
    targets = {task: torch.randn(MICRO_BATCH, width, generator=gen) for task, width in TASKS.items()}
    return x, targets


def make_engine(stage: int = 2, model: nn.Module | None = None):
    """The run's engine: AdamW over two parameter groups (decay / no decay), as the trainer builds it."""
    torch.manual_seed(0)
    model = model or TinyMTL()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10_000,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def full_state(engine) -> dict:
    """Gathered fp32 masters and Adam moments of every trainable parameter (collective). ZeRO-0 keeps
    them where torch does: the parameter itself and torch's optimizer state."""
    out = {}
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            master = safe_get_full_fp32_param(param)
            out[f"param/{name}"] = (param.detach() if master is None else master).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                moment = safe_get_full_optimizer_state(param, key)
                out[f"{key}/{name}"] = (base.state[param][key] if moment is None else moment).clone()
            with deepspeed.zero.GatheredParameters([param]):
                out[f"module/{name}"] = param.detach().clone()
    out["adam_step"] = sorted({float(s["step"]) for s in base.state.values() if "step" in s})
    out["lr"] = [g["lr"] for g in engine.optimizer.param_groups]
    out["scheduler"] = engine.lr_scheduler.state_dict()["last_epoch"]
    out["global_steps"] = engine.global_steps
    return out


class Pieces:
    """The per-rank state of this toy run: torch's RNG (dropout) and the next step (data position)."""

    def __init__(self) -> None:
        self.next_step = 0

    def state_dict(self) -> dict:
        return {"rng": torch.get_rng_state(), "next_step": self.next_step}

    def load_state_dict(self, state: dict, same_world: bool) -> None:
        self.next_step = int(state["next_step"])
        if same_world:
            torch.set_rng_state(state["rng"])


def install_kill_hook(step: int, when: str) -> None:
    """Die like a preempted node: ``marker`` when every file is written and the marker is next;
    ``upload`` in the middle of the background upload (one file up, the rest not)."""
    tag = f"step_{step:08d}"
    if when == "marker":
        original = checkpoint_storage.atomic_write

        def atomic_write(url, data, storage=None):
            if url.endswith(f"{tag}/COMPLETE.json"):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(url, data, storage)

        checkpoint_storage.atomic_write = atomic_write
    else:
        original_publish = checkpoint_storage.CheckpointStore.publish

        def publish(self, tag_, staged, marker):
            if tag_ == tag:
                first = next(iter(marker["files"]))
                self.fs.put_file(os.path.join(staged, first), f"{self.path}/{tag_}/{first}")
                os.kill(os.getpid(), signal.SIGKILL)
            return original_publish(self, tag_, staged, marker)

        checkpoint_storage.CheckpointStore.publish = publish


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--kill-when", choices=("marker", "upload"), default="marker")
    parser.add_argument("--report", required=True)
    parser.add_argument("--dump-after-load", default="")
    parser.add_argument("--dump-at-end", default="")
    args = parser.parse_args()

    torch.set_num_threads(1)
    # Skip the JIT build of DeepSpeed's CPU shared-memory all-reduce (~90 s per machine): gloo is enough here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    if args.kill_at_step:
        install_kill_hook(args.kill_at_step, args.kill_when)

    engine = make_engine(args.stage)
    torch.manual_seed(100 + rank)  # each rank's own dropout stream
    logger = RunLogger(
        args.run_dir,
        enabled=rank == 0,
        start=False,
        local_dir=str(Path(args.report).with_suffix("")) + "-log" if "://" in args.run_dir else None,
    )
    pieces = Pieces()
    ckpt = Checkpointer(
        args.run_dir, engine, policy=SavePolicy(args.save_every, args.keep_last), fingerprint=FINGERPRINT
    )
    ckpt.register("toy", pieces, per_rank=True)
    ckpt.register("run_log", logger, per_rank=False)
    start = ckpt.resume() or 0
    assert pieces.next_step == start, (pieces.next_step, start)
    if args.dump_after_load:
        dump = full_state(engine)
        if rank == 0:
            torch.save(dump, args.dump_after_load)

    losses = {}
    for step in range(start + 1, args.steps + 1):
        x, targets = batch(step - 1, rank)
        out = engine(x)
        loss = sum(F.mse_loss(out[t], targets[t]) for t in TASKS)
        engine.backward(loss)
        engine.step()
        losses[step] = loss.item()
        logger.log({"step": step, "split": "train", "loss": losses[step]})
        pieces.next_step = step
        if ckpt.should_save(step, final=False, stopping=False):
            ckpt.save(step)
            logger.flush()
    ckpt.wait()
    logger.close()

    if args.dump_at_end:
        dump = full_state(engine)
        if rank == 0:
            torch.save(dump, args.dump_at_end)
    all_losses = [None] * dist.get_world_size()
    dist.all_gather_object(all_losses, losses)
    if rank == 0:
        report = {
            "start": start,
            "losses": all_losses,
            "latest": ckpt.latest(),
            "world_size": dist.get_world_size(),
            "loaded_world_size": ckpt.loaded_world_size,
            "blocked_s": ckpt.blocked_s,
        }
        Path(args.report).write_text(json.dumps(report))
    dist.barrier()
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # its status, never a process group's teardown abort
