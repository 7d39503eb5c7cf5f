"""Evaluation results as files: the evaluator's JSON report and the same table in Markdown
(``tasks/results_table.py`` draws both tables)."""

from __future__ import annotations

import json
from typing import Any

from mtlora_dist.storage.atomic import atomic_write_text
from mtlora_dist.storage.fs import StorageOptions, join
from mtlora_dist.tasks.results_table import markdown_table

__all__ = ["markdown_table", "write_results"]


def write_results(
    report: dict[str, Any], out_dir: str, stem: str, storage: StorageOptions | None = None
) -> dict[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir`` (local or remote); returns their URLs."""
    urls = {"json": join(out_dir, f"{stem}.json"), "markdown": join(out_dir, f"{stem}.md")}
    atomic_write_text(urls["json"], json.dumps(report, indent=2, sort_keys=False) + "\n", storage)
    atomic_write_text(urls["markdown"], markdown_table(report), storage)
    return urls
