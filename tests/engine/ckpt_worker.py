"""A tiny MTLoRA-shaped training run for the checkpoint tests, one process per rank.

Started by ``tests/engine/test_checkpoint_resume.py`` with the ``deepspeed`` launcher or with plain
``RANK``/``WORLD_SIZE`` variables. It builds a frozen ``Linear(256, 256)`` "backbone" with a trainable
low-rank adapter and two trainable task heads, trains on data derived from ``(step, rank)`` only, saves
through :class:`~mtlora_dist.engine.checkpoint.Checkpointer` every ``--save-every`` steps and resumes from
``--run-dir`` when it holds a checkpoint. Rank 0 writes a JSON report (per-rank losses by step, where it
started) and, on request, the full (gathered) trainable and optimizer state.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

from mtlora_dist.engine.checkpoint import Checkpointer, frozen_fingerprint  # noqa: E402

TASKS = {"semseg": 8, "depth": 1}
MICRO_BATCH = 4


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


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10_000,
    }


def full_state(engine) -> dict:
    """Gathered fp32 masters and Adam moments of every trainable parameter (collective)."""
    out = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            out[f"param/{name}"] = safe_get_full_fp32_param(param).clone()
            out[f"module/{name}"] = param.detach().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{key}/{name}"] = safe_get_full_optimizer_state(param, key).clone()
    base = engine.optimizer.optimizer
    out["adam_step"] = [float(base.state[g["params"][0]]["step"]) for g in base.param_groups]
    out["lr"] = [g["lr"] for g in base.param_groups]
    out["scheduler"] = engine.lr_scheduler.state_dict()["last_epoch"]
    out["global_steps"] = engine.global_steps
    return out


def install_kill_hook(step_to_kill: int) -> None:
    """Die like a preempted node at the worst moment: every file uploaded, no marker yet."""
    original = Checkpointer._commit

    def commit(self, engine, tag, step, files):
        if step == step_to_kill:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, engine, tag, step, files)

    Checkpointer._commit = commit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--kill-at-step", type=int, default=0)
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
        install_kill_hook(args.kill_at_step)

    torch.manual_seed(0)
    model = TinyMTL()
    frozen = frozen_fingerprint(model)
    torch.manual_seed(100 + rank)  # each rank's own dropout stream
    trainable = [p for p in model.parameters() if p.requires_grad]
    warmup = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[{"params": trainable}],
                                           config=ds_config(args.stage), lr_scheduler=warmup)

    ckpt = Checkpointer(args.run_dir, keep_last=args.keep_last,
                        fingerprint={"model": "tiny-mtl", "tasks": sorted(TASKS), "lora_rank": 4})
    state = ckpt.load(engine)
    start = 0
    if state is not None:
        start = state["step"]
        torch.set_rng_state(state["rng"])  # dropout draws from the torch CPU generator
        assert state["frozen"] == frozen_fingerprint(engine.module), "frozen backbone changed on resume"
        assert state["data"] == {"epoch": 0, "next_step": start}, state["data"]
    if args.dump_after_load:
        dump = full_state(engine)
        if rank == 0:
            torch.save(dump, args.dump_after_load)

    losses = {}
    for step in range(start, args.steps):
        x, targets = batch(step, rank)
        out = engine(x)
        loss = sum(F.mse_loss(out[t], targets[t]) for t in TASKS)
        engine.backward(loss)
        engine.step()
        losses[step + 1] = loss.item()
        if (step + 1) % args.save_every == 0:
            ckpt.save(engine, step + 1, {"step": step + 1, "rng": torch.get_rng_state(), "frozen": frozen,
                                         "data": {"epoch": 0, "next_step": step + 1}, "wandb_id": "run-abc"})

    if args.dump_at_end:
        dump = full_state(engine)
        if rank == 0:
            torch.save(dump, args.dump_at_end)
    all_losses = [None] * dist.get_world_size()
    dist.all_gather_object(all_losses, losses)
    if rank == 0:
        report = {"start": start, "losses": all_losses, "latest": ckpt.latest(), "world_size": dist.get_world_size(),
                  "loaded_world_size": ckpt.loaded_world_size}
        Path(args.report).write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    main()
