"""Trainable and total parameters of a configured model, by group.

python launch/params.py --config configs/pascal_swin_t_r64.yaml [--json] [key=value ...]
"""

from __future__ import annotations

import json

import _cli


@_cli.friendly_errors
def main(argv: list[str] | None = None) -> None:
    parser = _cli.config_parser(
        __doc__,
        config_help="a YAML under configs/ (default: configs/quickstart.yaml)",
        overrides_help="key=value overrides",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    args = _cli.parse(parser, argv)

    from mtlora_dist.config import load_config

    cfg = load_config(args.config, args.overrides)
    if _cli.print_or_prepare(args, cfg, needs_data=False):
        return

    from mtlora_dist.models import build_model
    from mtlora_dist.models.params import format_report, parameter_report

    cfg.model.pretrained = None  # counting needs shapes, not weights
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    report = parameter_report(model)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


if __name__ == "__main__":
    main()
