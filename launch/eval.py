"""Evaluate a trained checkpoint: the per-task table with Delta-m (console, JSON, Markdown), the training
curves and a prediction grid.

    python launch/eval.py checkpoint=runs/quickstart                          # newest complete checkpoint
    python launch/eval.py --config configs/zero2.yaml checkpoint=s3://b/runs/x/checkpoints/step_00001000 \
        data.eval_protocol=official out=results/x
    deepspeed --num_accelerators 2 launch/eval.py checkpoint=s3://b/runs/x    # or torchrun / srun

``checkpoint=`` (required), ``out=`` (default ``<run_dir>/eval``) and ``split=`` (``val``, or ``train``
evaluated without augmentation) are not config keys; every other ``key=value`` overrides the config, which is
``--config`` or, without it, the run's saved ``config.yaml``. ``--cfg job`` prints the resolved config and exits. Exit status 2 on a known failure
(configuration, data or storage, checkpoint missing or of another configuration), with one message.
"""

from __future__ import annotations

import _cli

EXTRA_KEYS = ("checkpoint", "out", "split")


@_cli.friendly_errors
def main(argv: list[str] | None = None) -> None:
    parser = _cli.config_parser(
        __doc__,
        config_help="a YAML under configs/ (default: the run's config.yaml)",
        overrides_help="checkpoint=PATH [out=DIR] [split=val] [key=value ...]",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args = _cli.parse(parser, argv)

    from mtlora_dist.config import ConfigError, run_config, run_dir_of

    extra, overrides = _cli.split_cli_keys(args.overrides, EXTRA_KEYS)
    if not extra.get("checkpoint"):
        raise ConfigError("checkpoint=PATH is required: a run directory or <run_dir>/checkpoints/step_XXXXXXXX")
    cfg = run_config(extra["checkpoint"], args.config, overrides)
    if _cli.print_or_prepare(args, cfg):
        return

    from mtlora_dist.reports.eval_job import evaluate_checkpoint

    with _cli.mismatch_explained(cfg, run_dir_of(extra["checkpoint"])):
        evaluate_checkpoint(cfg, extra["checkpoint"], out_dir=extra.get("out"), split=extra.get("split", "val"),
                            local_rank=args.local_rank)  # fmt: skip


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # its status, never a process group's teardown abort
