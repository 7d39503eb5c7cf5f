"""Conversion throughput: images/s and images/s per core of ``convert`` (dataset on disk -> shards).

    python benchmarks/convert_throughput.py [--dataset pascal_context] [--num-images 256] [--size 448]
        [--workers 1 2] [--repeats 3] [--shard-size-mb 32] [--work-dir DIR] [--json out.json]

Makes a synthetic dataset in the real layout (``mtlora_dist.synthetic.datasets``, images about ``--size``
pixels high, like PASCAL's ~500x375), then converts its train split into a fresh local folder once per
repeat and worker count (``convert(..., workers=N)``: N encoding processes, the main process writing,
checksumming and copying the shards). Reported per worker count, medians over ``--repeats``:

* ``images/s``: images over the wall time of the whole conversion (pool start-up included);
* ``images/s per core``: ``images/s`` divided by the cores the conversion had, min(workers, CPUs);
  what one core of a SLURM array task converts, for sizing ``--array`` and ``--cpus-per-task``;
* ``images/CPU-s``: images per CPU-second of the main process and its workers (the work itself,
  whatever the machine's load);
* ``main process images/CPU-s`` (workers > 1): images per CPU-second of the main process alone, which
  receives, writes, checksums and copies every byte: the most one part converts, however many workers.

The first conversion of each setting is a warm-up (file cache, imports) and is not counted. Output goes
to a local folder: object-storage upload overlaps encoding (one shard in flight) and is not measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]

from mtlora_dist.data.ingest.convert import convert  # noqa: E402
from mtlora_dist.synthetic.datasets import ensure_synthetic  # noqa: E402

from common import emit  # noqa: E402


def cpu_seconds() -> tuple[float, float]:
    """CPU time of this process, and of its finished children (the pool's workers, once joined)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def convert_once(args: argparse.Namespace, root: str, workers: int) -> dict:
    """One conversion into a fresh folder: wall and CPU seconds, images and shards."""
    out = tempfile.mkdtemp(prefix="convert-bench-", dir=args.work_dir)
    try:
        (own, kids), start = cpu_seconds(), time.perf_counter()
        manifest = convert(args.dataset, root, "train", out, shard_size_mb=args.shard_size_mb, workers=workers)
        wall = time.perf_counter() - start
        own, kids = cpu_seconds()[0] - own, cpu_seconds()[1] - kids
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "wall_s": wall,
        "cpu_s": own + kids,
        "main_cpu_s": own,
        "images": manifest["num_samples"],
        "shards": len(manifest["shards"]),
    }


def measure(args: argparse.Namespace, root: str, workers: int) -> dict:
    convert_once(args, root, workers)  # warm-up
    runs = [convert_once(args, root, workers) for _ in range(args.repeats)]
    rates = [r["images"] / r["wall_s"] for r in runs]
    cores = min(workers, usable_cpus())
    return {
        "workers": workers,
        "cores": cores,
        "images": runs[0]["images"],
        "shards": runs[0]["shards"],
        "images_per_s": round(statistics.median(rates), 1),
        "images_per_s_per_core": round(statistics.median(rates) / cores, 1),
        "images_per_cpu_s": round(statistics.median(r["images"] / r["cpu_s"] for r in runs), 1),
        # the main process receives, writes, checksums and copies every byte: with workers > 1 this is the
        # most one part converts, however many workers it has
        "main_process_images_per_cpu_s": round(statistics.median(r["images"] / r["main_cpu_s"] for r in runs), 1),
        "all_images_per_s": [round(r, 1) for r in rates],
        "wall_s": [round(r["wall_s"], 2) for r in runs],
    }


def print_table(rows: list[dict]) -> None:
    header = ["workers", "images/s", "images/s per core", "images/CPU-s", "main process images/CPU-s", "all runs"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        cells = [
            r["workers"],
            r["images_per_s"],
            r["images_per_s_per_core"],
            r["images_per_cpu_s"],
            r["main_process_images_per_cpu_s"],
            r["all_images_per_s"],
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("pascal_context", "nyud"), default="pascal_context")
    parser.add_argument("--num-images", type=int, default=256, help="images in the converted split")
    parser.add_argument("--size", type=int, default=448, help="height of the synthetic images in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="encoding processes to compare")
    parser.add_argument("--repeats", type=int, default=3, help="timed conversions per setting (median reported)")
    parser.add_argument("--shard-size-mb", type=float, default=32.0)
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mtlora-convert-bench"))
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    os.makedirs(args.work_dir, exist_ok=True)
    root = os.path.join(args.work_dir, f"{args.dataset}-{args.size}-{args.num_images}")
    ensure_synthetic(args.dataset, root, args.num_images, 1, seed=0, size=args.size)
    rows = [measure(args, root, workers) for workers in args.workers]
    emit(
        {
            "results": rows,
            "setup": {
                "command": " ".join(["python"] + sys.argv),
                "dataset": args.dataset,
                "image_height": args.size,
                "shard_size_mb": args.shard_size_mb,
                "repeats": args.repeats,
                "cpus": usable_cpus(),
                "load_average_at_end": os.getloadavg(),
                "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"),
            },
        },
        args.json,
    )
    print_table(rows)


if __name__ == "__main__":
    main()
