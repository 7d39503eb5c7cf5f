"""Trainable and total parameters of a configured model, by group; or of every method side by side.

python launch/params.py --config configs/pascal_swin_t_r64.yaml [--json] [key=value ...]
python launch/params.py --config configs/pascal_swin_t_r64.yaml method=full_ft
python launch/params.py --config configs/pascal_swin_t_r64.yaml --all-methods [--json] [key=value ...]

``--all-methods`` composes the config once per ``method=`` option (configs/method/); ``single_task`` is one
model per task of ``data.tasks``, listed per task and summed. Models are built on torch's ``meta`` device
(shapes only; no weights read).
"""

from __future__ import annotations

import json

import _cli

# The order of the table: the paper's Table 1, baselines first.
METHODS = ("single_task", "full_ft", "decoders_only", "bitfit", "lora", "mtlora", "mtlora_plus")


def _counts(cfg) -> dict:
    from mtlora_dist.models.params import count_parameters

    return count_parameters(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)


def method_rows(config: str | None, overrides: list[str]) -> list[dict]:
    """One row per method (``single_task``: one per task, then their sum): method, tasks, trainable,
    trainable as the paper counts, total, models."""
    from mtlora_dist.config import load_config

    tasks = list(load_config(config, overrides).data.tasks)
    rows = []
    for method in METHODS:
        if method == "single_task":
            singles = []
            for task in tasks:
                report = _counts(load_config(config, [*overrides, f"method={method}", f"data.tasks=[{task}]"]))
                singles.append(_row(method, [task], report, models=1))
            rows += singles
            if len(singles) > 1:
                rows.append(
                    {
                        "method": f"{method} (sum of {len(singles)})",
                        "tasks": tasks,
                        **{k: sum(r[k] for r in singles) for k in ("trainable", "trainable_as_paper", "total")},
                        "models": len(singles),
                    }
                )
        else:
            rows.append(_row(method, tasks, _counts(load_config(config, [*overrides, f"method={method}"])), models=1))
    return rows


def _row(method: str, tasks: list[str], report: dict, models: int) -> dict:
    keep = ("trainable", "trainable_as_paper", "total")
    return {"method": method, "tasks": tasks, **{k: report[k] for k in keep}, "models": models}


def format_rows(rows: list[dict]) -> str:
    width = max(len(r["method"]) for r in rows) + 2
    lines = [f"{'method':<{width}}{'tasks':<32}{'trainable':>13}{'as paper':>13}{'total':>14}"]
    for r in rows:
        tasks = ",".join(r["tasks"])
        lines.append(
            f"{r['method']:<{width}}{tasks:<32}{r['trainable']:>13,}{r['trainable_as_paper']:>13,}{r['total']:>14,}"
        )
    return "\n".join(lines)


@_cli.friendly_errors
def main(argv: list[str] | None = None) -> None:
    parser = _cli.config_parser(
        __doc__,
        config_help="a YAML under configs/ (default: configs/quickstart.yaml)",
        overrides_help="key=value overrides (method=full_ft, adapter=mtlora_r16, data.tasks=[semseg], ...)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    parser.add_argument("--all-methods", action="store_true", help="one row per method= option (configs/method/)")
    args = _cli.parse(parser, argv)

    from mtlora_dist.config import load_config

    cfg = load_config(args.config, args.overrides)
    if _cli.print_or_prepare(args, cfg, needs_data=False):
        return
    if args.all_methods:
        rows = method_rows(args.config, args.overrides)
        print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
        return

    from mtlora_dist.models.params import format_report

    report = {"method": str(cfg.method.name), **_counts(cfg)}
    print(json.dumps(report, indent=2) if args.json else f"method: {cfg.method.name}\n{format_report(report)}")


if __name__ == "__main__":
    main()
