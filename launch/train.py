"""Train MTLoRA on a Swin backbone.

    python launch/train.py                                     # CPU quickstart (synthetic data, tiny model)
    deepspeed launch/train.py --config configs/zero2.yaml data.train_url=s3://... data.val_url=s3://...
    torchrun --nproc_per_node 8 launch/train.py --config configs/pascal_swin_b.yaml
    srun python launch/train.py --config ...                  # one task per GPU under SLURM

A run pointed at a ``run_dir`` that holds checkpoints resumes from the newest complete one. Exit
status: 0 finished (or ``steps_per_job`` reached), 3 stopped by SIGTERM/SIGUSR1/SIGINT after writing a
checkpoint (requeue), 2 configuration error, anything else a real error.
"""

from __future__ import annotations

import argparse
import sys

import _cli  # noqa: F401  (puts the checkout on sys.path)


@_cli.friendly_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a YAML under configs/ (default: configs/quickstart.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. deepspeed.zero_stage=1")
    args = parser.parse_args(argv)

    from mtlora_dist.engine.config import load_config

    cfg = load_config(args.config, args.overrides)  # validated before anything is written

    from mtlora_dist.engine.trainer import EXIT_PREEMPTED, train

    result = train(cfg, local_rank=args.local_rank)
    if result.preempted:
        sys.exit(EXIT_PREEMPTED)  # checkpoint written; the SLURM script requeues on this status


if __name__ == "__main__":
    main()
