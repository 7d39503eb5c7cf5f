"""The reader of a declared dataset (``data.format`` in a data config; ``data/ingest/format_spec.py``).

Samples are the files the image pattern matches; their ``{fields}`` name them and fill in the label
patterns. A sample's key is its field values joined by ``__`` (tar keys may hold neither ``.`` nor
``/``), so any process can read a sample from its key alone, without listing the dataset again.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import numpy as np

from mtlora_dist.data.ingest.format_spec import FIELD, DatasetFormat
from mtlora_dist.data.ingest.formats.base import load_rgb
from mtlora_dist.data.ingest.formats.decoders import DeclaredSample, decode_label

__all__ = ["DeclaredReader", "KEY_SEPARATOR"]

KEY_SEPARATOR = "__"


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A regex matching paths of ``pattern`` (fields filled in except ``{split}``, which must be filled)."""
    out, pos, seen = [], 0, set()
    for m in FIELD.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        name = m.group(1)
        out.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+?)")
        seen.add(name)
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


class DeclaredReader:
    """Reads canonical samples of a declared dataset (the same interface as ``LayoutReader``).

    Args:
        dataset: the dataset's registered name.
        fmt: its declaration.
        root: the dataset root folder.
        tasks: tasks to read (default: every declared task).
        split: the split whose ``{split}`` fills the patterns (``ids`` sets it too).
    """

    def __init__(
        self,
        dataset: str,
        fmt: DatasetFormat,
        root: str,
        tasks: list[str] | tuple[str, ...] | None = None,
        split: str | None = None,
    ) -> None:
        self.dataset = dataset
        self.fmt = fmt
        self.root = str(root)
        self.tasks = tuple(tasks) if tasks else tuple(fmt.tasks)
        unknown = [t for t in self.tasks if t not in fmt.tasks]
        if unknown:
            raise ValueError(f"dataset '{dataset}' declares no task(s) {unknown}; it declares {list(fmt.tasks)}")
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"{dataset} root folder not found: {self.root}")
        self.split = split
        self._fields = fmt.sample_fields()
        self.optional_tasks = tuple(t for t in self.tasks if fmt.tasks[t].optional)

    # ---------------------------------------------------------------------------------------- listing

    def ids(self, split: str) -> list[str]:
        """Keys of ``split``'s samples, sorted (the conversion's order, so its output is reproducible)."""
        self.split = split
        filled = self.fmt.image.replace("{split}", split)
        regex = _pattern_regex(filled)
        matched = glob.glob(os.path.join(glob.escape(self.root), FIELD.sub("*", filled)))
        keys = []
        for path in matched:
            m = regex.match(os.path.relpath(path, self.root).replace(os.sep, "/"))
            if m is not None:
                keys.append(self._key([m.group(f) for f in self._fields], path))
        if self.fmt.split_file:
            wanted = self._split_members(split)
            keys = [k for k in keys if k.split(KEY_SEPARATOR)[0] in wanted]
        if not keys:
            raise FileNotFoundError(
                f"no image of split '{split}' matches '{self.fmt.image}' under {self.root}"
                + (f" and is listed in {self.fmt.split_file.format(split=split)}" if self.fmt.split_file else "")
                + "; check the root folder and the data config's format.image"
            )
        return sorted(keys)

    def _split_members(self, split: str) -> set[str]:
        path = os.path.join(self.root, self.fmt.split_file.format(split=split))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"split file for '{split}' not found: {path}")
        with open(path) as f:
            return {line.strip() for line in f if line.strip()}

    @staticmethod
    def _key(values: list[str], path: str) -> str:
        bad = [v for v in values if "." in v or "/" in v or KEY_SEPARATOR in v or not v]
        if bad:
            raise ValueError(
                f"{path}: field value(s) {bad} cannot name a sample (no '.', '/' or '{KEY_SEPARATOR}'); make the "
                "image pattern's fields cover only such parts of the name (put dots and extensions in the pattern)"
            )
        return KEY_SEPARATOR.join(values)

    def _sample(self, key: str) -> dict[str, str]:
        if self.split is None:
            raise ValueError("the reader has no split: call ids(split) or pass split=")
        values = key.split(KEY_SEPARATOR)
        if len(values) != len(self._fields):
            raise ValueError(f"sample key '{key}' does not have the fields {self._fields}")
        return {**dict(zip(self._fields, values, strict=True)), "split": self.split}

    # ---------------------------------------------------------------------------------------- reading

    def image_path(self, sample_id: str) -> str:
        return os.path.join(self.root, self.fmt.image.format(**self._sample(sample_id)))

    def read(self, sample_id: str) -> dict[str, Any]:
        """The canonical sample; an optional task whose file is missing is left out (a partial label)."""
        fields = self._sample(sample_id)
        image = load_rgb(self.image_path(sample_id))
        sample_files = DeclaredSample(self.root, fields, image.shape[:2])
        sample: dict[str, Any] = {"__key__": sample_id, "image": image}
        for task in self.tasks:
            label = self.fmt.tasks[task]
            if label.optional and label.file and not os.path.isfile(sample_files.path(label.file)):
                continue
            value = decode_label(sample_files, label)
            if value.shape[:2] != image.shape[:2]:
                raise ValueError(
                    f"{self.dataset} sample {sample_id}: '{task}' label is {value.shape[:2]} but the image is "
                    f"{image.shape[:2]}; labels must have the image's size"
                )
            sample[task] = np.ascontiguousarray(value)
        return sample
