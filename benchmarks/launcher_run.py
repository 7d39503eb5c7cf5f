"""A short real training run through the project's launcher, and what its run directory shows.

    python benchmarks/launcher_run.py --config configs/pascal_swin_b.yaml --steps 30 --launcher deepspeed \
        --run-dir /tmp/mtlora-launcher [--resume-steps 5] [--nproc 2] [--json out.json] [key=value ...]

Runs ``launch/train.py`` (under ``deepspeed --num_gpus 1``, ``torchrun --nproc-per-node N`` or plain
``python``) on the built-in synthetic data for ``--steps`` optimizer steps, with one evaluation and one
checkpoint at the last step and wandb off, then reads the run directory as a user would: the training
losses in ``metrics.jsonl`` (finite, and with ten or more steps falling beyond the noise:
:func:`judge_losses`), the evaluation record, and the newest *complete* checkpoint as the project's own
``Checkpointer`` defines it (marker written, every listed file present with its size). With
``--resume-steps R`` the same command runs again to ``steps + R``: it must resume from that checkpoint
(steps ``steps+1 .. steps+R`` logged once each, no step repeated) and end with a newer complete
checkpoint. ``--launcher torchrun --nproc 2`` starts two ranks whatever the GPU count (DeepSpeed's
launcher gives each rank a GPU of its own). Exit status 0 when all of that holds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]

from common import emit, subprocess_env  # noqa: E402


def launcher_prefix(launcher: str, nproc: int = 1) -> list[str]:
    """The command that starts ``launch/train.py``: DeepSpeed's launcher on one GPU, torchrun with
    ``nproc`` ranks, or plain python."""
    if launcher == "python":
        return [sys.executable]
    from mtlora_dist.engine.distributed import free_port

    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}",
        ]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port())]


def train_command(args: argparse.Namespace, steps: int) -> list[str]:
    """``launch/train.py`` to ``steps``, evaluating and saving a checkpoint at ``args.steps`` and at the end."""
    return [
        *launcher_prefix(args.launcher, args.nproc),
        os.path.join(REPO, "launch", "train.py"),
        "--config",
        args.config,
        "data=synthetic",
        f"data.synthetic.root={args.run_dir}-data",
        f"run_dir={args.run_dir}",
        f"max_steps={steps}",
        f"eval.every={args.steps}",
        f"eval.max_batches={args.eval_batches}",
        f"checkpoint.every={args.steps}",  # and at the last step
        "logging.log_every=1",
        "logging.progress_bar=false",
        "logging.wandb.enabled=false",
        *args.overrides,
    ]


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def judge_losses(losses: list[float]) -> dict:
    """Finite, and (with ten or more steps) falling beyond the step-to-step noise: the last five steps'
    mean below the first five's, and the least-squares slope over all steps below zero by more than
    twice its standard error. Noise (a new batch each step, dropout) moves single losses by ~15 %;
    two means of five or a slope that is not past its error bound can move either way by chance."""
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    if len(losses) < 10 or not finite:
        return {"losses_finite": finite, "loss_first5": None, "loss_last5": None, "loss_slope": None,
                "loss_slope_bound": None, "loss_falling": None}  # fmt: skip
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    steps = list(range(len(losses)))
    slope, intercept = statistics.linear_regression(steps, losses)
    residual = sum((v - (intercept + slope * x)) ** 2 for x, v in zip(steps, losses)) / (len(losses) - 2)
    spread = sum((x - statistics.mean(steps)) ** 2 for x in steps)
    bound = slope + 2 * math.sqrt(residual / spread)  # slope plus two standard errors
    return {
        "losses_finite": finite,
        "loss_first5": first,
        "loss_last5": last,
        "loss_slope": slope,
        "loss_slope_bound": bound,
        "loss_falling": last < first and bound < 0,
    }


def complete_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint's tag, by the Checkpointer's own definition."""
    from mtlora_dist.checkpoint import CheckpointStore

    found = CheckpointStore(run_dir.rstrip("/") + "/checkpoints").newest_complete()
    return found[0] if found else None


def run(cmd: list[str]) -> tuple[int, float]:
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    returncode = subprocess.run(cmd, cwd=REPO, env=subprocess_env(WANDB_MODE="disabled")).returncode
    return returncode, time.perf_counter() - start


def judge_resume(args: argparse.Namespace, first_checkpoint: str | None) -> dict:
    """Run the same command on to ``steps + resume_steps``; it must continue from the checkpoint."""
    total = args.steps + args.resume_steps
    returncode, seconds = run(train_command(args, total))
    steps = [r["step"] for r in read_metrics(args.run_dir) if r.get("split") == "train"]
    checkpoint = complete_checkpoint(args.run_dir)
    return {
        "resume_returncode": returncode,
        "resume_seconds": seconds,
        "resume_checkpoint": checkpoint,
        "resumed": returncode == 0
        and steps == list(range(1, total + 1))  # every step once: continued, neither restarted nor repeated
        and checkpoint is not None
        and checkpoint != first_checkpoint,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--launcher", choices=("deepspeed", "torchrun", "python"), default="deepspeed")
    parser.add_argument("--nproc", type=int, default=1, help="ranks (torchrun only)")
    parser.add_argument("--resume-steps", type=int, default=0, help="then resume and train this many steps more")
    parser.add_argument("--run-dir", default="/tmp/mtlora-launcher-run")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="more key=value overrides for launch/train.py")
    args = parser.parse_intermixed_args()  # key=value overrides may stand between the options
    shutil.rmtree(args.run_dir, ignore_errors=True)  # a fresh run, not a resume of an earlier one

    cmd = train_command(args, args.steps)
    returncode, seconds = run(cmd)
    records = read_metrics(args.run_dir)
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "val"]
    result = {
        "command": " ".join(cmd),
        "returncode": returncode,
        "seconds": seconds,
        "steps": len(train),
        "train_losses": [r["loss"] for r in train],
        **judge_losses([r["loss"] for r in train]),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in train[1:]) if len(train) > 1 else None,
        "eval_steps": [r["step"] for r in evals],
        "delta_m": evals[-1].get("delta_m") if evals else None,
        "checkpoint": complete_checkpoint(args.run_dir),
    }
    result["passed"] = bool(
        returncode == 0
        and len(train) == args.steps
        and result["losses_finite"]
        and result["loss_falling"] is not False
        and evals
        and result["checkpoint"]
    )
    if args.resume_steps and result["passed"]:
        result.update(judge_resume(args, result["checkpoint"]))
        result["passed"] = result["resumed"]
    emit(result, args.json)
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
