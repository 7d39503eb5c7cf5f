"""Readers for datasets as laid out on disk; each returns canonical samples (see ``base``)."""

from __future__ import annotations

from typing import Any

from mtlora_dist.data.formats import nyud, pascal_context
from mtlora_dist.data.formats.base import LayoutReader

__all__ = ["READERS", "LayoutReader", "get_reader"]

READERS = {"pascal_context": pascal_context.make_reader, "nyud": nyud.make_reader}


def get_reader(dataset: str, root: str, tasks: list[str] | tuple[str, ...] | None = None, **kwargs: Any) -> LayoutReader:
    """The reader of ``dataset`` under ``root`` for ``tasks`` (default: all of the dataset's tasks)."""
    try:
        make = READERS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset '{dataset}'; valid datasets: {sorted(READERS)}") from None
    return make(root, tasks, **kwargs)
