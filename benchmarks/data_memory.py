"""Peak RSS of a one-epoch training run as the dataset grows: the read buffer bounds it, not the dataset.

    python benchmarks/data_memory.py [--base-samples 200] [--scale 8] [--size 128 256] [--buffer-mb 32]
        [--whole-shards] [--json out.json]

Makes a sorted Cityscapes-like set (``synthetic.layouts.make_cityscapes_tree``: cities one after the
other, as the converter stores real Cityscapes) of ``--base-samples`` samples (~29 MB of shards at the
defaults) and the same set ``--scale`` times over (each city copied under new names, ~230 MB), converts
both, and runs ``launch/train.py`` for exactly one epoch on each: one rank, ``data.num_workers=0`` (the
reader runs in the training process), the tiny quickstart model at 64 px, ``data.read.buffer_mb``
``--buffer-mb``. Each run is its own process; its peak RSS is ``ru_maxrss`` from ``wait4``.
Reported: peak RSS per run and its growth from the small to the large set.

``--whole-shards`` also runs both sets with the per-sample index stripped from the manifest (what
conversions before the index wrote): the reader then reads whole shards and holds every sample until
its turn, so memory grows with the dataset -- the reference the bound replaces.

``--schedule`` instead evaluates the read schedule (``stream/read_schedule.schedule_reads``, pure) of
one worker's epoch at dataset shapes no test machine holds, for several ``--buffers``: the peak bytes
held ahead of delivery, requests per sample, and what reading each needed shard once in storage order
(the reader before the bound) would hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]

from mtlora_dist.config import data_config  # noqa: E402
from mtlora_dist.data.config import BatchGeometry  # noqa: E402
from mtlora_dist.data.ingest.convert import convert  # noqa: E402
from mtlora_dist.data.shards.manifest import read_manifest  # noqa: E402
from mtlora_dist.data.stream.plan import locate, make_worker_plan, shard_order  # noqa: E402
from mtlora_dist.data.stream.read_schedule import SampleRange, schedule_reads, storage_order_peak  # noqa: E402
from mtlora_dist.synthetic.layouts import make_cityscapes_tree  # noqa: E402

from common import emit  # noqa: E402

# the quickstart's tiny model at 64 px, no workers, evaluation only at the end, no checkpoint before it
TINY = [
    "data=cityscapes",
    "model.img_size=[64,64]",
    "model.backbone_kwargs.window_size=2",
    "data.eval_batch_size=4",
    "data.num_workers=0",
    "logging.log_every=50",
    "logging.progress_bar=false",
    "eval.every=0",
    "checkpoint.every=0",
]


def shard_set(work: str, name: str, base_tree: str, copies: int, whole: bool) -> tuple[str, int, int]:
    """Shards of the base tree repeated ``copies`` times (cities in sorted order); (url, samples, bytes)."""
    url = os.path.join(work, f"shards-{name}{'-whole' if whole else ''}")
    if not os.path.isfile(os.path.join(url, "manifest.json")):
        tree = os.path.join(work, f"tree-{name}")
        if copies > 1 and not os.path.isdir(tree):
            for kind in ("leftImg8bit", "gtFine", "disparity", "camera"):
                src = os.path.join(base_tree, kind, "train")
                for city in sorted(os.listdir(src)):
                    for k in range(copies):
                        shutil.copytree(os.path.join(src, city), os.path.join(tree, kind, "train", f"{city}{k}"))
        convert("cityscapes", base_tree if copies == 1 else tree, "train", url, fmt=data_config("cityscapes").format,
                shard_size_mb=8)  # fmt: skip
        if whole:  # the index stripped: the manifest of a conversion before it existed
            manifest = read_manifest(url)
            stripped = replace(manifest, shards=[replace(s, offsets=[], digests="") for s in manifest.shards])
            with open(os.path.join(url, "manifest.json"), "w") as f:
                f.write(stripped.to_json())
    manifest = read_manifest(url)
    return url, manifest.num_samples, sum(s.bytes for s in manifest.shards)


def train_peak_rss(url: str, val_url: str, samples: int, args: argparse.Namespace, run_dir: str) -> dict:
    """One epoch of ``launch/train.py`` on ``url``; its peak RSS (MB) and wall time."""
    steps = samples // args.batch_size
    cmd = [
        sys.executable, os.path.join(REPO, "launch", "train.py"), "--config", os.path.join(REPO, "configs", "quickstart.yaml"),
        *TINY, f"data.train_url={url}", f"data.val_url={val_url}", f"data.batch_size={args.batch_size}",
        f"data.read.buffer_mb={args.buffer_mb}", f"max_steps={steps}", f"run_dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    log = open(run_dir + ".log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(run_dir))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        with open(run_dir + ".log") as f:
            raise SystemExit(f"train.py failed ({proc.returncode}):\n{f.read()[-3000:]}")
    held = re.findall(r'"read_held_peak": (\d+)', open(os.path.join(run_dir, "metrics.jsonl")).read())
    return {
        "steps": steps,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "read_held_peak_mb": round(int(held[-1]) / 2**20, 1) if held else None,  # the loader's own count
        "wall_s": round(time.perf_counter() - start, 1),
    }


# (name, samples, samples per shard, ranks, workers, micro-batch, MB per sample)
SHAPES = [
    ("Cityscapes 2,975 (8.5 MB: depth float32 at 1024x2048)", 2975, 100, 8, 4, 4, 8.5),
    ("Taskonomy 400,000 (1.3 MB), 1,000 per shard", 400_000, 1000, 64, 8, 16, 1.3),
    ("ImageNet 1.28M (0.11 MB), 1,281 per shard", 1_281_167, 1281, 256, 8, 128, 0.11),
]


def schedule_rows(buffers_mb: list[float]) -> list[dict]:
    """Worker 0 of rank 0, epoch 0, at each shape: the schedule's peak and requests per buffer."""
    rows = []
    for name, n, per_shard, world, workers, micro, sample_mb in SHAPES:
        counts = [per_shard] * (n // per_shard) + ([n % per_shard] if n % per_shard else [])
        size = int(sample_mb * 2**20)
        plan = make_worker_plan(
            n, BatchGeometry(micro, 1, world), rank=0, num_workers=workers, worker=0, seed=0, epoch=0, shuffle=True,
            drop_last=True,
        )  # fmt: skip
        slots = locate(plan.positions, counts, shard_order(len(counts), 0, 0, True))
        ranges = [SampleRange(s, i, i * size, (i + 1) * size) for s, i in slots]
        unbounded = storage_order_peak(ranges) / 2**20
        for mb in buffers_mb:
            sched = schedule_reads(ranges, int(mb * 2**20))
            rows.append({
                "shape": name, "ranks x workers, micro": f"{world} x {workers}, {micro}", "samples/worker": len(ranges),
                "buffer_MB": mb, "peak_held_MB": round(sched.peak_held_bytes / 2**20, 1),
                "requests_per_sample": round(sched.requests_per_sample, 3),
                "bytes_x": round(sched.bytes / (size * len(ranges)), 3),
                "storage_order_peak_MB": round(unbounded, 1),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print("\n| shape | ranks x workers, micro | samples/worker | buffer MB | peak held MB | requests/sample | bytes x "
          "| held before (storage order) MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['ranks x workers, micro']} | {r['samples/worker']} | {r['buffer_MB']:g} | "
              f"{r['peak_held_MB']} | {r['requests_per_sample']} | {r['bytes_x']} | {r['storage_order_peak_MB']} |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-samples", type=int, default=200)
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=[128, 256], help="H W of the synthetic images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--buffer-mb", type=float, default=32)
    parser.add_argument("--whole-shards", action="store_true", help="also run with the index stripped")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mtlora-data-memory"))
    parser.add_argument("--schedule", action="store_true", help="evaluate the read schedule at scale instead")
    parser.add_argument("--buffers", type=float, nargs="+", default=[32, 256, 1024], help="MB, with --schedule")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.schedule:
        emit({"schedule": schedule_rows(args.buffers)}, args.json)
        return

    work = os.path.join(args.work_dir, f"{args.base_samples}-{args.size[0]}x{args.size[1]}")
    os.makedirs(work, exist_ok=True)
    base = os.path.join(work, "tree-1x")
    if not os.path.isdir(base):
        make_cityscapes_tree(base, {"train": args.base_samples}, tuple(args.size))
    val_tree = os.path.join(work, "tree-val")
    val_url = os.path.join(work, "shards-val")
    if not os.path.isfile(os.path.join(val_url, "manifest.json")):
        make_cityscapes_tree(val_tree, {"val": 4}, tuple(args.size))
        convert("cityscapes", val_tree, "val", val_url, fmt=data_config("cityscapes").format)
    rows = []
    for whole in (False, True) if args.whole_shards else (False,):
        for name, copies in (("1x", 1), (f"{args.scale}x", args.scale)):
            url, samples, size = shard_set(work, name, base, copies, whole)
            row = {"set": name, "reading": "whole shards (no index)" if whole else "ranged, bounded",
                   "samples": samples, "shard_MB": round(size / 2**20, 1)}  # fmt: skip
            row.update(train_peak_rss(url, val_url, samples, args, os.path.join(work, f"run-{name}-{whole}")))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\none rank, no workers, data.read.buffer_mb={args.buffer_mb}, tiny model at 64 px, one epoch")
    print("| reading | set | samples | shards MB | steps | peak RSS MB | growth MB | read_held_peak MB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        growth = round(r["peak_rss_mb"] - rows[i - 1]["peak_rss_mb"], 1) if i % 2 else ""
        r["growth_mb"] = growth
        print(f"| {r['reading']} | {r['set']} | {r['samples']} | {r['shard_MB']} | {r['steps']} | {r['peak_rss_mb']} "
              f"| {growth} | {r['read_held_peak_mb']} | {r['wall_s']} |")  # fmt: skip
    setup = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), **vars(args)}
    emit({"rows": rows, "setup": setup}, args.json)


if __name__ == "__main__":
    main()
