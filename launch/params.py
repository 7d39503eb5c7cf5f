"""Trainable and total parameters of a configured model, by group.

    python launch/params.py --config configs/pascal_swin_t_r64.yaml [--json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json

import _cli  # noqa: F401  (puts the checkout on sys.path)
from mtlora_dist.engine.config import load_config  # noqa: E402
from mtlora_dist.models import build_model  # noqa: E402
from mtlora_dist.models.params import format_report, parameter_report  # noqa: E402


@_cli.friendly_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML under configs/")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    cfg.model.pretrained = None  # counting needs shapes, not weights
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    report = parameter_report(model)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


if __name__ == "__main__":
    main()
