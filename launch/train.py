"""Train MTLoRA on a Swin backbone.

    python launch/train.py                                     # CPU quickstart (synthetic data, tiny model)
    deepspeed launch/train.py --config configs/zero2.yaml data.train_url=s3://... data.val_url=s3://...
    torchrun --nproc_per_node 8 launch/train.py --config configs/pascal_swin_b.yaml data.train_url=... data.val_url=...
    srun python launch/train.py --config ...                  # one task per GPU under SLURM
    python launch/train.py --config configs/zero2.yaml --cfg job   # print the resolved config and exit

A run pointed at a ``run_dir`` that holds checkpoints resumes from the newest complete one. Only the
quickstart (``data=synthetic``) trains on generated data; every other recipe needs data.train_url and
data.val_url. The config is checked before torch and DeepSpeed are imported.

Exit status:
  0  finished (or ``steps_per_job`` reached)
  2  a known failure, one message and no traceback: configuration, data or storage unreachable, a
     checkpoint written for another configuration
  3  stopped by SIGTERM/SIGUSR1/SIGINT after writing a checkpoint (requeue; rerun the same command)
  1  another rank of the job died (the message names it; the newest complete checkpoint stands)
  anything else: a bug (with its traceback)
"""

from __future__ import annotations

import sys

import _cli


@_cli.friendly_errors
def main(argv: list[str] | None = None) -> None:
    parser = _cli.config_parser(
        __doc__,
        config_help="a YAML under configs/ (default: configs/quickstart.yaml)",
        overrides_help="KEY=VALUE or GROUP=OPTION overrides, e.g. deepspeed.zero_stage=1",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args = _cli.parse(parser, argv)

    from mtlora_dist.config import load_config

    cfg = load_config(args.config, args.overrides)  # validated before anything is written or imported
    if _cli.print_or_prepare(args, cfg):
        return
    _cli.prepare_training(cfg)  # a used run_dir, a changed config.yaml refused; a CPU's cost said

    from mtlora_dist.engine.trainer import EXIT_PREEMPTED, train
    from mtlora_dist.reports import TrainingReporter

    with _cli.mismatch_explained(cfg, cfg.run_dir):
        result = train(cfg, local_rank=args.local_rank, reports=TrainingReporter.from_config)
    if result.preempted:
        sys.exit(EXIT_PREEMPTED)  # checkpoint written; the SLURM script requeues on this status


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # a finished run's status is 0 (or 3), never a teardown abort
