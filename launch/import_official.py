"""Bring a checkpoint of the official MTLoRA code (scale-lab/MTLoRA) in as a run of this framework.

    python launch/import_official.py --config configs/pascal_swin_t_r64.yaml official=ckpt_epoch_299.pth \
        run_dir=runs/official_r64
    python launch/eval.py checkpoint=runs/official_r64          # or launch/export.py, or continue training

``official=`` (required) is the official ``torch.save`` file; ``backbone_out=`` (optional) where the frozen
backbone it holds is written as the run's ``model.pretrained`` (default
``<run_dir>/pretrained_backbone.safetensors``; never over an existing file; with ``model.pretrained`` set, the
file's backbone is checked equal to it instead). ``optimizer=official`` (optional; default ``fresh``) also
brings in the official run's step, schedule position and AdamW moments, so training continues where the
official run stopped. ``weights=KEY`` imports another weight copy of the file (an EMA). Every other
``key=value`` overrides the config, which must be the one the official run trained (every MTLoRA setting,
the tasks, image size and backbone are compared with the file's config). The file is read without running
code from it. Exit status 2, with one message, for a file that is unsafe, damaged, of another
configuration, or missing. Details: docs/recipes.md.
"""

from __future__ import annotations

import _cli

EXTRA_KEYS = ("official", "backbone_out", "optimizer", "weights")


@_cli.friendly_errors
def main(argv: list[str] | None = None) -> None:
    parser = _cli.config_parser(
        __doc__,
        config_help="a YAML under configs/: the recipe the official run matches",
        overrides_help="official=PATH [backbone_out=PATH] [optimizer=fresh|official] [weights=KEY] [key=value ...]",
    )
    args = _cli.parse(parser, argv)

    from mtlora_dist.config import ConfigError, load_config

    extra, overrides = _cli.split_cli_keys(args.overrides, EXTRA_KEYS)
    if not extra.get("official") and not args.cfg:
        raise ConfigError("official=PATH (the official MTLoRA checkpoint) is required")
    cfg = load_config(args.config, overrides)
    if _cli.print_or_prepare(args, cfg, needs_data=False):
        return

    from mtlora_dist.engine.console import setup_logging
    from mtlora_dist.engine.import_official import import_official

    setup_logging(0)  # results on stdout, warnings on stderr
    url = import_official(
        cfg,
        extra["official"],
        extra.get("backbone_out"),
        optimizer=extra.get("optimizer", "fresh"),
        weights=extra.get("weights", "model"),
    )
    print(f"imported {extra['official']} as {url}")


if __name__ == "__main__":
    main()
