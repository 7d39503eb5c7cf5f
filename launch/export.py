"""Export a trained checkpoint for inference: adapters folded into the weights, safetensors + export.json.

    python launch/export.py checkpoint=runs/quickstart out=exports/quickstart [--config PATH] [key=value ...]
    python launch/export.py checkpoint=s3://b/runs/x/checkpoints/step_00001000 out=exports/x fold_task_proj=true

Load it with ``mtlora_dist.export.load(out)`` and run ``mtlora_dist.export.predict(model, image)``; neither
needs DeepSpeed. ``fold_task_proj=true`` also folds the task-specific attention projections into per-task
weights (exact; no faster on CPUs so far: docs/performance-export.md). The export checks its outputs against the
trained model before writing. Without ``--config`` the run's saved ``config.yaml`` is used.
"""

from __future__ import annotations

import argparse

import _cli  # noqa: F401  (puts the checkout on sys.path)

EXTRA_KEYS = ("checkpoint", "out", "fold_task_proj")


@_cli.friendly_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a YAML under configs/ (default: the run's config.yaml)")
    parser.add_argument("overrides", nargs="*", help="checkpoint=PATH out=DIR [fold_task_proj=false] [key=value ...]")
    args = parser.parse_args(argv)

    from mtlora_dist.engine.config import ConfigError
    from mtlora_dist.engine.restore import run_config, split_cli_keys

    extra, overrides = split_cli_keys(args.overrides, EXTRA_KEYS)
    if not extra.get("checkpoint") or not extra.get("out"):
        raise ConfigError("checkpoint=PATH and out=DIR are required")
    fold = extra.get("fold_task_proj", "false").lower()
    if fold not in ("true", "false"):
        raise ConfigError(f"fold_task_proj must be true or false, got '{fold}'")
    cfg = run_config(extra["checkpoint"], args.config, overrides)

    import logging

    from mtlora_dist.export.from_checkpoint import export_checkpoint

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    export_checkpoint(cfg, extra["checkpoint"], extra["out"], fold_task_proj=fold == "true")


if __name__ == "__main__":
    main()
