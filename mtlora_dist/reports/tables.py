"""Evaluation results as files: the evaluator's JSON report and the same table in Markdown."""

from __future__ import annotations

import json
from typing import Any

from mtlora_dist.storage.atomic import atomic_write_text
from mtlora_dist.storage.fs import StorageOptions, join

__all__ = ["markdown_table", "write_results"]


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(report: dict[str, Any]) -> str:
    """``report``: ``MultiTaskEvaluator.to_json`` output, optionally with ``checkpoint``, ``step`` and
    ``split``. One row per task and metric; the primary metric is bold and carries baseline and change."""
    title = f"# Evaluation of `{report['checkpoint']}`" if "checkpoint" in report else "# Evaluation"
    facts = [f"{k}: {report[k]}" for k in ("step", "split", "dataset", "protocol") if k in report]
    lines = [title, "", " · ".join(facts), "", _row("task", "metric", "better", "value", "single-task", "change %"),
             "|---|---|---|---:|---:|---:|"]
    for task, entry in report["tasks"].items():
        for name, value in entry["metrics"].items():
            if name != entry["primary_metric"]:
                lines.append(_row(task, name, "", _fmt(value), "", ""))
                continue
            better = "higher" if entry["higher_is_better"] else "lower"
            baseline = _fmt(entry["baseline"]) if entry["in_delta_m"] else "not in Δm"
            change = _fmt(entry["relative_change"], signed=True) if entry["in_delta_m"] else ""
            lines.append(_row(task, f"**{name}**", better, f"**{_fmt(value)}**", baseline, change))
    in_dm = [t for t, e in report["tasks"].items() if e["in_delta_m"]]
    delta = report.get("delta_m")
    lines += ["", f"**Δm: {_fmt(delta, signed=True)} %** over {', '.join(in_dm)}" if in_dm and delta is not None
              else "Δm: n/a"]
    return "\n".join(lines) + "\n"


def write_results(report: dict[str, Any], out_dir: str, stem: str,
                  storage: StorageOptions | None = None) -> dict[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir`` (local or remote); returns their URLs."""
    urls = {"json": join(out_dir, f"{stem}.json"), "markdown": join(out_dir, f"{stem}.md")}
    atomic_write_text(urls["json"], json.dumps(report, indent=2, sort_keys=False) + "\n", storage)
    atomic_write_text(urls["markdown"], markdown_table(report), storage)
    return urls
