"""Readers for datasets as laid out on disk; each returns canonical samples (see ``base``).

Built in: PASCAL-Context and NYUD-v2 (``READERS``). Any other dataset is declared in a data config
(``data.format``) and read by :class:`~mtlora_dist.data.ingest.formats.declared.DeclaredReader`; label
decoders for storage that needs more than a kind's default (``cityscapes``: disparity + camera -> depth)
register themselves in ``decoders.DECODERS`` when this package imports them.
"""

from __future__ import annotations

from typing import Any

from mtlora_dist.data.ingest.format_spec import DatasetFormat
from mtlora_dist.data.ingest.formats import cityscapes, nyud, pascal_context
from mtlora_dist.data.ingest.formats.base import LayoutReader
from mtlora_dist.data.ingest.formats.declared import DeclaredReader

__all__ = ["READERS", "DeclaredReader", "LayoutReader", "get_reader"]

READERS = {"pascal_context": pascal_context.make_reader, "nyud": nyud.make_reader}
BUILTIN_DECODER_MODULES = (cityscapes,)  # imported for the label decoders they register (decoders.DECODERS)


def get_reader(
    dataset: str,
    root: str,
    tasks: list[str] | tuple[str, ...] | None = None,
    *,
    fmt: DatasetFormat | None = None,
    split: str | None = None,
    **kwargs: Any,
) -> LayoutReader | DeclaredReader:
    """The reader of ``dataset`` under ``root`` for ``tasks`` (default: all of the dataset's tasks):
    the built-in one, or the declared ``fmt``'s."""
    if fmt is not None:
        return DeclaredReader(dataset, fmt, root, tasks, split)
    try:
        make = READERS[dataset]
    except KeyError:
        raise ValueError(
            f"unknown dataset '{dataset}'; built-in datasets: {sorted(READERS)}; any other needs its declared "
            "format (a data config with a 'format:' section, docs/data.md)"
        ) from None
    return make(root, tasks, **kwargs)
