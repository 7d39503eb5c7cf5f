"""The per-task result table: one set of rows (from ``MultiTaskEvaluator.to_json``) drawn two ways,
fixed-width text for the console and Markdown for files (``reports/tables.py`` writes those).

One row per task and metric; the task's primary metric carries the single-task baseline and the
relative change that enter Delta-m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["text_table", "markdown_table", "result_rows", "HEADER"]

HEADER = ("task", "metric", "better", "value", "single-task", "change %")


@dataclass(frozen=True)
class _Style:
    short_small_values: bool  # 4 significant digits below 1 (console) or always 2 decimals (Markdown)
    not_in_delta_m: str
    bold_primary: bool


_TEXT = _Style(short_small_values=True, not_in_delta_m="none: not in delta-m", bold_primary=False)
_MARKDOWN = _Style(short_small_values=False, not_in_delta_m="not in Δm", bold_primary=True)


class Row(NamedTuple):
    task: str
    metric: str
    better: str
    value: str
    baseline: str
    change: str


def _fmt(value: float | None, style: _Style, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    if signed:
        return f"{value:+.2f}"
    return f"{value:.4g}" if style.short_small_values and abs(value) < 1 else f"{value:.2f}"


def result_rows(report: dict[str, Any], style: _Style = _TEXT) -> list[Row]:
    rows = []
    for task, entry in report["tasks"].items():
        for name, value in entry["metrics"].items():
            if name != entry["primary_metric"]:
                rows.append(Row(task, name, "", _fmt(value, style), "", ""))
                continue
            bold = "**" if style.bold_primary else ""
            better = "higher" if entry["higher_is_better"] else "lower"
            if entry["in_delta_m"]:
                baseline, change = _fmt(entry["baseline"], style), _fmt(entry["relative_change"], style, signed=True)
            else:
                baseline, change = style.not_in_delta_m, ""
            rows.append(Row(task, f"{bold}{name}{bold}", better, f"{bold}{_fmt(value, style)}{bold}", baseline, change))
    return rows


def _tasks_in_delta_m(report: dict[str, Any]) -> list[str]:
    return [t for t, e in report["tasks"].items() if e["in_delta_m"]]


def text_table(report: dict[str, Any]) -> str:
    """The console table, then the Delta-m and protocol lines."""
    rows = [HEADER, *result_rows(report, _TEXT)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    in_dm, dm = _tasks_in_delta_m(report), report["delta_m"]
    if not in_dm:
        lines.append("delta-m: n/a (no task has a baseline)")
    elif dm is None:
        lines.append(f"delta-m: n/a (a primary metric over {in_dm} has no value: no valid pixels seen)")
    else:
        lines.append(f"delta-m: {dm:+.2f} % over {in_dm}")
    lines.append(f"protocol: {report['protocol']}")
    return "\n".join(lines)


def _md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(report: dict[str, Any]) -> str:
    """``report`` may also hold ``checkpoint``, ``step`` and ``split`` (shown above the table)."""
    title = f"# Evaluation of `{report['checkpoint']}`" if "checkpoint" in report else "# Evaluation"
    facts = [f"{k}: {report[k]}" for k in ("step", "split", "dataset", "protocol") if k in report]
    lines = [title, "", " · ".join(facts), "", _md_row(HEADER), "|---|---|---|---:|---:|---:|"]
    lines += [_md_row(row) for row in result_rows(report, _MARKDOWN)]
    in_dm, delta = _tasks_in_delta_m(report), report.get("delta_m")
    lines += [
        "",
        f"**Δm: {_fmt(delta, _MARKDOWN, signed=True)} %** over {', '.join(in_dm)}"
        if in_dm and delta is not None
        else "Δm: n/a",
    ]
    return "\n".join(lines) + "\n"
