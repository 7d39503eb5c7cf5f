"""Trainer runs of every ``loss.balancing`` method in one process group, for ``test_balancing_runs.py``.

Started once per rank (plain ``RANK``/``WORLD_SIZE`` variables, gloo on the CPU). Runs the jobs of a JSON
file one after another through ``trainer._run`` (the whole training job but the process group set-up,
so the group and the imports are paid once): the quickstart's tiny model at 32 px on a small synthetic
set. A job may first copy another job's run_dir and drop its checkpoints after step ``resume_at`` (a run
killed after that checkpoint), and may train with today's step in place of the trainer's (``legacy``:
the pre-balancing ``_train_step`` and ``MultiTaskLoss.forward``, verbatim). Rank 0 writes a report: per
job, each rank's last task weights (every rank must hold the same).

    python balancing_worker.py --jobs jobs.json --report report.json --data DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed.ops  # noqa: E402
import torch  # noqa: E402

from mtlora_dist import comm  # noqa: E402
from mtlora_dist.config import load_config  # noqa: E402
from mtlora_dist.engine import trainer  # noqa: E402
from mtlora_dist.engine.data_setup import data_world  # noqa: E402
from mtlora_dist.engine.distributed import init_distributed  # noqa: E402
from mtlora_dist.engine.evaluate import to_device  # noqa: E402
from mtlora_dist.engine.signals import TerminationFlag  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.img_size=[32,32]",
    "model.backbone_kwargs.window_size=2",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.num_workers=0",
    "data.synthetic.num_train=16",
    "data.synthetic.num_val=2",
    "logging.log_every=1",
    "logging.progress_bar=false",
    "logging.wandb.enabled=false",
    "eval.every=0",
    "eval.max_batches=1",
    "eval.visual_samples=0",
]


def legacy_train_step(engine, batches, loss_fn, info, dtype, accumulation: int) -> dict[str, torch.Tensor]:
    """``trainer._train_step`` and ``MultiTaskLoss.forward``'s total as they were before ``loss.balancing``."""
    sums: dict[str, torch.Tensor] = {}
    for _ in range(accumulation):
        batch = to_device(next(batches), info.device, dtype)
        outputs = engine(batch["image"])
        preds = {t: o.float() for t, o in outputs.items()}
        per_task = {t: loss_fn.losses[t](preds[t], batch[t]) for t in loss_fn.tasks}
        total = torch.stack([loss_fn.weights[t] * per_task[t] for t in loss_fn.tasks]).sum()
        per_task = {t: loss.detach() for t, loss in per_task.items()}
        engine.backward(total)
        engine.step()
        for name, value in {"loss": total.detach(), **per_task}.items():
            share = value / accumulation
            sums[name] = sums[name] + share if name in sums else share
    return sums


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--data", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of the shm all-reduce
    info = init_distributed(None, timeout_s=300, backend="gloo")
    stop = TerminationFlag(announce=False)
    balancers = []
    build = trainer.build_balancer
    trainer.build_balancer = lambda *a, **k: balancers.append(build(*a, **k)) or balancers[-1]
    new_step = trainer._train_step

    report = {}
    for job in json.loads(Path(args.jobs).read_text()):
        run_dir = Path(job["run_dir"])
        if job.get("resume_from") and info.rank == 0:
            shutil.copytree(job["resume_from"], run_dir)
            for ckpt in (run_dir / "checkpoints").glob("step_*"):
                if int(ckpt.name.split("_")[1]) > job["resume_at"]:
                    shutil.rmtree(ckpt)
        comm.barrier()
        cfg = load_config(
            str(REPO / "configs" / "quickstart.yaml"),
            [*TINY, f"data.synthetic.root={args.data}", f"run_dir={run_dir}", *job["overrides"]],
        )
        trainer._train_step = legacy_train_step if job.get("legacy") else new_step
        result = trainer._run(cfg, info, stop, None, data_world(info, num_workers=0))  # TINY: no workers
        weights = {t: float(w) for t, w in balancers[-1].weights_used().items()}
        report[job["name"]] = {"step": result.step, "weights_per_rank": comm.all_gather_object(weights)}
    if info.rank == 0:
        Path(args.report).write_text(json.dumps(report))
    comm.shutdown()


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # its status, never a process group's teardown abort
