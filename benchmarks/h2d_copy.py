"""Host-to-device copy rate of one training batch from pageable and from pinned host memory.

    python benchmarks/h2d_copy.py [--batch 32] [--size 448] [--repeats 20] [--json out.json]

The batch is what the loader hands the trainer (fp32 images plus uint8 labels of four tasks, about
the image's bytes again in labels); each copy is timed with CUDA events around ``tensor.to(cuda,
non_blocking=True)``, median of ``--repeats`` after a warm-up. A pageable copy is staged by the
driver through its own pinned buffer and blocks the host; a pinned one is a direct DMA and lets the
host go on, so the difference is what ``pin_memory`` in the loader buys per batch. Needs CUDA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit  # noqa: E402


def host_batch(batch: int, size: int, pinned: bool) -> list[torch.Tensor]:
    """Images and four label maps of one batch in host memory."""
    tensors = [torch.randn(batch, 3, size, size)] + [torch.zeros(batch, size, size, dtype=torch.uint8)] * 4
    return [t.pin_memory() if pinned else t.clone() for t in tensors]


def copy_seconds(tensors: list[torch.Tensor], device: torch.device, repeats: int) -> list[float]:
    """Seconds per copy of all ``tensors`` to ``device``, timed with CUDA events."""
    times = []
    for i in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for t in tensors:
            t.to(device, non_blocking=True)
        end.record()
        end.synchronize()
        if i:  # the first is a warm-up
            times.append(start.elapsed_time(end) / 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("h2d_copy.py needs a CUDA device")
    device = torch.device("cuda")
    result: dict = {"device": torch.cuda.get_device_name(device), "batch": args.batch, "size": args.size}
    for kind in ("pageable", "pinned"):
        tensors = host_batch(args.batch, args.size, pinned=kind == "pinned")
        seconds = statistics.median(copy_seconds(tensors, device, args.repeats))
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        result[kind] = {"ms_per_batch": seconds * 1e3, "gb_per_s": nbytes / seconds / 1e9, "mib": nbytes / 2**20}
    result["pinned_speedup"] = result["pageable"]["ms_per_batch"] / result["pinned"]["ms_per_batch"]
    result["date"] = time.strftime("%Y-%m-%d")
    emit(result, args.json)


if __name__ == "__main__":
    main()
