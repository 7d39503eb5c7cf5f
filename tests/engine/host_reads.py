"""Counting host reads (each a device sync on an accelerator) by who made them: the Tensor methods that
copy a value to Python, patched to record the first caller outside torch itself."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
_TORCH = str(Path(torch.__file__).parent)


def _where(frame) -> str:
    path = Path(frame.f_code.co_filename)
    for package in ("mtlora_dist", "deepspeed", "torch"):
        if package in path.parts:
            path = Path(*path.parts[len(path.parts) - 1 - path.parts[::-1].index(package) :])
            break
    else:
        path = Path(path.name)
    return f"{path.as_posix()}:{frame.f_code.co_name}"


def _caller() -> str:
    """``package/file.py:function`` of the first frame outside torch, and ``(in torch/...)`` when the
    read itself happens inside torch (e.g. an optimizer's step counter)."""
    first = frame = sys._getframe(2)  # 0: here, 1: the patched method, 2: who called it
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH):
        frame = frame.f_back
    if frame is None:
        return _where(first)
    return _where(frame) + ("" if frame is first else f" (in {_where(first)})")


@contextlib.contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Within the block, a Counter of ``"<method> <caller>"`` for every host read (then the methods are
    restored)."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def patched(name, original):
        def counted(self, *args, **kwargs):
            counts[f"{name} {_caller()}"] += 1
            return original(self, *args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, patched(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def ours(counts: Counter) -> dict[str, int]:
    return {k: v for k, v in counts.items() if " mtlora_dist/" in k}


def deepspeeds(counts: Counter) -> dict[str, int]:
    return {k: v for k, v in counts.items() if " deepspeed/" in k}
