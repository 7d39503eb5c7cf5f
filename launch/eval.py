"""Evaluate a trained checkpoint: the per-task table with Delta-m (console, JSON, Markdown), the training
curves and a prediction grid.

    python launch/eval.py checkpoint=runs/quickstart                          # newest complete checkpoint
    python launch/eval.py --config configs/zero2.yaml checkpoint=s3://b/runs/x/checkpoints/step_00001000 \
        data.eval_protocol=official out=results/x
    deepspeed --num_accelerators 2 launch/eval.py checkpoint=s3://b/runs/x    # or torchrun / srun

``checkpoint=`` (required), ``out=`` (default ``<run_dir>/eval``) and ``split=`` (``val``, or ``train``
evaluated without augmentation) are not config keys; every other ``key=value`` overrides the config, which is
``--config`` or, without it, the run's saved ``config.yaml``. Exit status 2 on a configuration error.
"""

from __future__ import annotations

import argparse

import _cli  # noqa: F401  (puts the checkout on sys.path)

EXTRA_KEYS = ("checkpoint", "out", "split")


@_cli.friendly_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a YAML under configs/ (default: the run's config.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="checkpoint=PATH [out=DIR] [split=val] [key=value ...]")
    args = parser.parse_args(argv)

    from mtlora_dist.engine.config import ConfigError
    from mtlora_dist.engine.restore import run_config, split_cli_keys

    extra, overrides = split_cli_keys(args.overrides, EXTRA_KEYS)
    if not extra.get("checkpoint"):
        raise ConfigError("checkpoint=PATH is required: a run directory or <run_dir>/checkpoints/step_XXXXXXXX")
    cfg = run_config(extra["checkpoint"], args.config, overrides)

    from mtlora_dist.engine.eval_job import evaluate_checkpoint

    evaluate_checkpoint(cfg, extra["checkpoint"], out_dir=extra.get("out"), split=extra.get("split", "val"),
                        local_rank=args.local_rank)


if __name__ == "__main__":
    main()
