"""Export a trained checkpoint for inference: adapters folded into the weights, safetensors + export.json.

    python launch/export.py checkpoint=runs/quickstart out=exported/quickstart [--config PATH] [key=value ...]
    python launch/export.py checkpoint=s3://b/runs/x/checkpoints/step_00001000 out=exported/x fold_task_proj=true

Load it with ``mtlora_dist.export.load(out)`` and run ``mtlora_dist.export.predict(model, image)``; neither
needs DeepSpeed. ``fold_task_proj=true`` also folds the task-specific attention projections into per-task
weights (exact; no faster on CPUs so far: docs/performance-export.md). The export checks its outputs against the
trained model before writing. Without ``--config`` the run's saved ``config.yaml`` is used; ``--cfg job``
prints the resolved config and exits. Exit status 2 on a known failure (configuration, storage, checkpoint
missing or of another configuration), with one message.
"""

from __future__ import annotations

import _cli

EXTRA_KEYS = ("checkpoint", "out", "fold_task_proj")


@_cli.friendly_errors
def main(argv: list[str] | None = None) -> None:
    parser = _cli.config_parser(
        __doc__,
        config_help="a YAML under configs/ (default: the run's config.yaml)",
        overrides_help="checkpoint=PATH out=DIR [fold_task_proj=false] [key=value ...]",
    )
    args = _cli.parse(parser, argv)

    from mtlora_dist.config import ConfigError, run_config, run_dir_of

    extra, overrides = _cli.split_cli_keys(args.overrides, EXTRA_KEYS)
    if not extra.get("checkpoint") or (not extra.get("out") and not args.cfg):
        raise ConfigError("checkpoint=PATH and out=DIR are required")
    fold = extra.get("fold_task_proj", "false").lower()
    if fold not in ("true", "false"):
        raise ConfigError(f"fold_task_proj must be true or false, got '{fold}'")
    cfg = run_config(extra["checkpoint"], args.config, overrides)
    if _cli.print_or_prepare(args, cfg, needs_data=False):
        return

    from mtlora_dist.engine.console import setup_logging
    from mtlora_dist.export.from_checkpoint import export_checkpoint

    setup_logging(0)  # results on stdout, warnings on stderr
    with _cli.mismatch_explained(cfg, run_dir_of(extra["checkpoint"])):
        export_checkpoint(cfg, extra["checkpoint"], extra["out"], fold_task_proj=fold == "true")


if __name__ == "__main__":
    main()
