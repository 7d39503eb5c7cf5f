"""Decoded-and-augmented samples per second from local shards and from a loopback S3 server.

    python benchmarks/data_throughput.py [--num-samples 256] [--img-size 448] [--workers 0 1 2] [--json out.json]
        [--sources local s3] [--pin-memory off on] [--device cuda]

Makes a synthetic PASCAL-Context set whose images are about ``--img-size`` pixels high (like the
real ~500x375 images), converts it to shards, starts ``rclone serve s3`` on 127.0.0.1 exactly as the
tests do (``tests/s3_server.py``), uploads the shards, then runs one training epoch (flip, rotation,
scale, resize to ``img-size``; all five PASCAL tasks) per source and worker count. Reports:

* ``samples/s``: steady state, from the first batch to the last (worker start-up excluded), median
  of ``--repeats`` epochs run alternately from each source;
* ``epoch s``: wall time of the whole epoch including start-up;
* ``samples/CPU-s``: samples per CPU-second of the loader processes (main + workers, S3 server
  excluded), i.e. what one core sustains; size ``num_workers`` with it;
* ``server CPU-s``: CPU time the S3 server itself used during the epoch;
* a read-only pass (tar parsing, no decoding) per source, to show where the time goes.

``--epochs N`` reads N epochs back to back per measurement (persistent workers, as in training): with
many workers and a small set, one epoch is about one batch per worker, too short for a steady rate.
``--pin-memory off on`` runs each setting with pageable and with pinned batches; ``--device cuda``
also copies every batch to the GPU (``non_blocking``, as the trainer does), so the rate includes the
host-to-device transfer that pinning speeds up. ``--sources local`` needs no S3 server (rclone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from mtlora_dist.data import build_loader  # noqa: E402
from mtlora_dist.data.convert import convert  # noqa: E402
from mtlora_dist.data.manifest import read_manifest  # noqa: E402
from mtlora_dist.data.synthetic import ensure_synthetic  # noqa: E402
from mtlora_dist.data.tarshards import iter_tar_samples  # noqa: E402
from mtlora_dist.storage.fs import StorageOptions, cached_fs  # noqa: E402
from s3_server import KEY, SECRET, S3Server  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from common import sync  # noqa: E402

TASKS = ["semseg", "human_parts", "sal", "normals", "edge"]


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished DataLoader workers
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def to_device(batch: dict, device: torch.device | None) -> None:
    """Copy the batch's tensors to ``device`` as the trainer does (asynchronously from pinned memory)."""
    if device is None:
        return
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            value.to(device, non_blocking=True)


def run_epoch(url: str, storage: StorageOptions, workers: int, img: int, batch: int, server_pid: int | None,
              pin_memory: bool = False, device: torch.device | None = None, epochs: int = 1) -> dict:
    loader = build_loader(url, dataset="pascal_context", tasks=TASKS, split="train", img_size=(img, img),
                          batch_size=batch, num_workers=workers, storage=storage, seed=0, pin_memory=pin_memory)
    cpu0, server0 = cpu_seconds(), process_cpu(server_pid) if server_pid else 0.0
    start = time.perf_counter()
    first = None
    n = 0
    for b in (b for _ in range(epochs) for b in loader):
        n += len(b["__key__"])
        to_device(b, device)
        if first is None:
            first, n_first = time.perf_counter(), n
    sync(device or "cpu")
    end = time.perf_counter()
    loader.close()  # joins the (persistent) workers, so that their CPU time is in RUSAGE_CHILDREN
    cpu = cpu_seconds() - cpu0
    stats = loader.stats
    assert stats["samples_missing"] == stats["samples_skipped"] == 0, stats
    return {
        "samples": n,
        "samples_per_s": round((n - n_first) / (end - first), 1),
        "epoch_s": round(end - start, 2),
        "samples_per_cpu_s": round(n / cpu, 1),
        "server_cpu_s": round(process_cpu(server_pid) - server0, 2) if server_pid else None,
    }


def read_only(url: str, storage: StorageOptions) -> dict:
    manifest = read_manifest(url, storage)
    start, cpu0, n, size = time.perf_counter(), cpu_seconds(), 0, 0
    for i in range(len(manifest.shards)):
        fs, path = cached_fs(manifest.shard_url(i), storage)
        with fs.open(path, "rb", block_size=storage.block_size) as f:
            for _, members in iter_tar_samples(f):
                n += 1
                size += sum(len(v) for v in members.values())
    seconds = time.perf_counter() - start
    return {"samples_per_s": round(n / seconds, 1), "MB_per_s": round(size / seconds / 2**20, 1),
            "samples_per_cpu_s": round(n / (cpu_seconds() - cpu0), 1), "mean_sample_kB": round(size / n / 1024)}


@contextlib.contextmanager
def s3_source(local: str):
    """Serve a copy of the shards at ``local`` from a loopback S3 server; yields (url, storage, server pid)."""
    server_dir = tempfile.mkdtemp(prefix="bench-s3-")
    server = S3Server("rclone", Path(server_dir) / "data").start()
    try:
        server.make_bucket("bench")
        s3 = StorageOptions(endpoint_url=server.endpoint, key=KEY, secret=SECRET)
        os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")  # rclone's ranged reads
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        fs, _ = cached_fs("s3://bench", s3)
        for name in sorted(os.listdir(local)):
            fs.put_file(os.path.join(local, name), f"bench/pascal/{name}")
        yield "s3://bench/pascal", s3, server.proc.pid
    finally:
        server.stop()
        shutil.rmtree(server_dir, ignore_errors=True)


def measure(sources: dict, args: argparse.Namespace, device: torch.device | None) -> list[dict]:
    """Median epoch per (workers, pinning, source); sources alternate so that drift in machine load hits all."""
    rows = []
    for workers in args.workers:
        for pin in args.pin_memory:
            runs: dict[str, list[dict]] = {name: [] for name in sources}
            for _ in range(args.repeats):
                for name, (url, storage, pid) in sources.items():
                    runs[name].append(run_epoch(url, storage, workers, args.img_size, args.batch_size, pid,
                                                pin_memory=pin == "on", device=device, epochs=args.epochs))
            for name in sources:
                median = sorted(runs[name], key=lambda r: r["samples_per_s"])[len(runs[name]) // 2]
                rows.append({"source": name, "workers": workers, "pin_memory": pin == "on", **median,
                             "all_samples_per_s": [r["samples_per_s"] for r in runs[name]]})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sources", nargs="+", default=["local", "s3"], choices=("local", "s3"))
    parser.add_argument("--pin-memory", nargs="+", default=["off"], choices=("off", "on"),
                        help="run each setting with pageable (off) and/or pinned (on) batches")
    parser.add_argument("--device", default=None, help="also copy every batch to this device (e.g. cuda)")
    parser.add_argument("--shard-size-mb", type=float, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per setting; the median is reported")
    parser.add_argument("--epochs", type=int, default=1, help="epochs read back to back in one measurement")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mtlora-data-bench"))
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else None

    root = os.path.join(args.work_dir, f"pascal-{args.img_size}")
    ensure_synthetic("pascal_context", root, args.num_samples, 0, seed=0, size=args.img_size)
    local = os.path.join(args.work_dir, f"shards-{args.img_size}-{args.num_samples}")
    if not os.path.isfile(os.path.join(local, "manifest.json")):
        convert("pascal_context", root, "train", local, shard_size_mb=args.shard_size_mb, workers=os.cpu_count() or 1)
    manifest = read_manifest(local)

    with contextlib.ExitStack() as stack:
        sources = {"local": (local, StorageOptions(), None)}
        if "s3" in args.sources:
            sources["s3"] = stack.enter_context(s3_source(local))
        sources = {name: sources[name] for name in args.sources}
        results: dict = {"read_only": {name: read_only(url, storage) for name, (url, storage, _) in sources.items()}}
        results["epochs"] = measure(sources, args, device)

    results["setup"] = {
        "command": " ".join(["python"] + sys.argv),
        "samples": manifest.num_samples, "shards": len(manifest.shards), "img_size": args.img_size,
        "batch_size": args.batch_size, "epochs_per_measurement": args.epochs, "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "device": str(device) if device else None, "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("\n| source | workers | pinned | samples/s (median) | all runs | epoch s | samples/CPU-s | server CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["epochs"]:
        print(f"| {r['source']} | {r['workers']} | {r['pin_memory']} | {r['samples_per_s']} | {r['all_samples_per_s']} | "
              f"{r['epoch_s']} | {r['samples_per_cpu_s']} | {r['server_cpu_s'] if r['server_cpu_s'] is not None else '-'} |")
    if set(sources) == {"local", "s3"}:
        rate = {(r["source"], r["workers"], r["pin_memory"]): r["samples_per_s"] for r in results["epochs"]}
        for workers, pin in sorted({(w, p) for _, w, p in rate}):
            print(f"workers={workers} pinned={pin}: s3 / local = {rate['s3', workers, pin] / rate['local', workers, pin]:.2f}")


if __name__ == "__main__":
    main()
