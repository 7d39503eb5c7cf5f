"""Decoded-and-augmented samples per second from local shards and from a loopback S3 server.

    python benchmarks/data_throughput.py [--num-samples 256] [--img-size 448] [--workers 0 1 2] [--json out.json]
        [--sources local s3] [--pin-memory off on] [--device cuda] [--levers] [--cache] [--device-split]
        [--tasks ...] [--data-size PX] [--skip-sources] [--index]

Makes a synthetic PASCAL-Context set whose images are about ``--img-size`` pixels high (like the
real ~500x375 images), converts it to shards, starts ``rclone serve s3`` on 127.0.0.1 exactly as the
tests do (``tests/s3_server.py``), uploads the shards, then runs one training epoch (flip, rotation,
scale, resize to ``img-size``; ``--tasks``, by default the paper's four PASCAL tasks) per source and
worker count with the default pipeline. Reports:

* ``samples/s``: steady state, from the first batch to the last (worker start-up excluded), median
  of ``--repeats`` epochs run alternately from each source;
* ``epoch s``: wall time of the whole epoch including start-up;
* ``samples/CPU-s``: samples per CPU-second of the loader processes (main + workers, S3 server
  excluded), i.e. what one core sustains; size ``num_workers`` with it;
* ``server CPU-s``: CPU time the S3 server itself used during the epoch;
* a read-only pass (tar parsing, no decoding) per source, to show where the time goes.

``--levers``: today's pipeline and the same with each speed lever switched on in turn (cumulative;
the last row is the default), in one process, one core (no workers), local shards, configurations
alternating within each repeat; samples per CPU-second and the ratio to the baseline.
``--index``: the default pipeline, one core, local shards, reading through the manifest's per-sample
index (ranged reads of the needed samples) and reading whole shards (the index stripped), alternating
within each repeat; samples per CPU-second, the ratio, and the bytes each epoch read.
``--device-split``: ``augment_device="device"`` with the device being this CPU: decode plus the
batched torch warp, and the decode alone (the workers' share when the warp runs on a GPU).
``--cache``: from the S3 server, epoch 1 and epoch 2 of a two-epoch run with and without the local
shard cache (``cache_dir``), for the whole pipeline and for reading alone (shards read, verified and
split into samples, no decoding).

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
from dataclasses import replace
from pathlib import Path

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from mtlora_dist.data import build_loader  # noqa: E402
from mtlora_dist.data.config import (  # noqa: E402
    BatchGeometry,
    DataConfig,
    DataWorld,
    DecodeConfig,
    ReadConfig,
)
from mtlora_dist.data.ingest.convert import convert  # noqa: E402
from mtlora_dist.data.shards.manifest import read_manifest  # noqa: E402
from mtlora_dist.data.shards.tarshards import iter_tar_samples  # noqa: E402
from mtlora_dist.data.stream.reader import ReaderConfig, ShardReader  # noqa: E402
from mtlora_dist.storage.fs import StorageOptions, url_to_fs  # noqa: E402
from mtlora_dist.synthetic.datasets import ensure_synthetic  # noqa: E402

from s3_server import KEY, SECRET, S3Server  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from common import sync  # noqa: E402

TASKS = ["semseg", "human_parts", "sal", "normals"]  # the paper's four PASCAL-Context tasks
READ_KEYS = {"verify_checksums", "cache_dir", "cache_max_gb", "on_error", "prefetch_samples", "buffer_mb"}

# Today's pipeline before issue 15: no checksum, PIL decoders, torch grid_sample, bicubic normals.
BASELINE = {
    "verify_checksums": False,
    "jpeg": "pil",
    "png": "pil",
    "resampler": "torch",
    "normals_resampling": "bicubic",
    "reduced_decode": False,
}
# Levers (data.read / data.decode keys) switched on one after the other; the last row is the config's default.
LEVERS = [
    ("baseline (before)", {}),
    ("+ sha256 verified while streaming", {"verify_checksums": True}),
    ("+ simplejpeg (libjpeg-turbo)", {"jpeg": "simplejpeg"}),
    ("+ pyspng (libspng)", {"png": "pyspng"}),
    ("+ OpenCV warp", {"resampler": "opencv"}),
    ("+ bilinear normals", {"normals_resampling": "bilinear"}),
    ("+ reduced-size JPEG decode (= default, after)", {"reduced_decode": True}),
]


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


def train_loader(url: str, storage: StorageOptions, workers: int, img: int, batch: int, tasks=TASKS, **options):
    """The training loader of one process; ``options`` are ``data.read`` and ``data.decode`` keys."""
    read = {k: v for k, v in options.items() if k in READ_KEYS}
    decode = {k: v for k, v in options.items() if k not in READ_KEYS}
    data = DataConfig(
        dataset="pascal_context",
        tasks=list(tasks),
        batch_size=batch,
        storage=storage,
        read=ReadConfig(**read),
        decode=DecodeConfig(**decode),
    )
    world = DataWorld(num_workers=workers)
    return build_loader(url, "train", data, world, BatchGeometry(batch), img_size=(img, img), seed=0)


def run_epoch(
    url: str,
    storage: StorageOptions,
    workers: int,
    img: int,
    batch: int,
    server_pid: int | None,
    pin_memory: bool = False,
    device: torch.device | None = None,
    epochs: int = 1,
    tasks=TASKS,
    **options,
) -> dict:
    loader = train_loader(url, storage, workers, img, batch, tasks, **options)
    loader.pin_memory = pin_memory  # measured both ways, whatever the device
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
        "bytes_read": stats["bytes_read"],
    }


def levers(url: str, args: argparse.Namespace) -> list[dict]:
    """Samples per CPU-second of the baseline and of each lever added (one core, local shards)."""
    configs, options = [], dict(BASELINE)
    for name, change in LEVERS:
        options = {**options, **change}
        configs.append((name, dict(options)))
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for _ in range(args.repeats):
        for name, options in configs:
            runs[name].append(_local_epoch(url, args, **options))
    rows = []
    for name, options in configs:
        median = sorted(runs[name], key=lambda r: r["samples_per_cpu_s"])[len(runs[name]) // 2]
        rows.append(
            {
                "pipeline": name,
                "options": options,
                **median,
                "all_samples_per_cpu_s": [r["samples_per_cpu_s"] for r in runs[name]],
            }
        )
    for row in rows:
        row["vs_baseline"] = round(row["samples_per_cpu_s"] / rows[0]["samples_per_cpu_s"], 2)
        print(json.dumps(row), flush=True)
    return rows


def index_compare(url: str, args: argparse.Namespace) -> list[dict]:
    """The default pipeline from local shards, one core, reading only the needed samples' byte ranges
    (the manifest's index) and reading whole shards (the same shards, the index stripped: what every
    conversion before the index gave), alternating within each repeat."""
    whole = os.path.join(args.work_dir, "whole-shards")
    shutil.rmtree(whole, ignore_errors=True)
    shutil.copytree(url, whole)
    manifest = read_manifest(whole)
    manifest.shards = [replace(s, offsets=[], digests="") for s in manifest.shards]
    Path(whole, "manifest.json").write_text(manifest.to_json())
    configs = [("whole shards (no index, before)", whole), ("ranged reads (index, after)", url)]
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for _ in range(args.repeats):
        for name, folder in configs:
            runs[name].append(_local_epoch(folder, args))
    rows = []
    for name, _ in configs:
        median = sorted(runs[name], key=lambda r: r["samples_per_cpu_s"])[len(runs[name]) // 2]
        rows.append({"reading": name, **median, "all_samples_per_cpu_s": [r["samples_per_cpu_s"] for r in runs[name]]})
    for row in rows:
        row["vs_before"] = round(row["samples_per_cpu_s"] / rows[0]["samples_per_cpu_s"], 3)
        print(json.dumps(row), flush=True)
    return rows


def _local_epoch(url: str, args: argparse.Namespace, **options) -> dict:
    """One epoch of ``args``' size from local shards in the main process (no workers), with ``options``."""
    return run_epoch(url, StorageOptions(), 0, args.img_size, args.batch_size, None, epochs=args.epochs,
                     tasks=args.tasks, **options)  # fmt: skip


def device_split(url: str, args: argparse.Namespace) -> list[dict]:
    """``augment_device="device"`` on this CPU: the whole path (workers' decode + the batched torch warp
    in the main process), and the workers' share alone (the warp replaced by a no-op), which is what a
    GPU node's CPUs still do when the warp runs on the GPU."""
    import mtlora_dist.data.stream.loader as loader_module

    warp = loader_module.warp_batch
    modes = {
        "decode + batched warp on the CPU": warp,
        "decode only (the workers' share)": lambda raw, tasks, out_hw, resampling: {"image": raw["image"]},
    }
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    try:
        for _ in range(args.repeats):
            for name, fn in modes.items():
                loader_module.warp_batch = fn
                runs[name].append(_local_epoch(url, args, augment_device="device", device="cpu"))
    finally:
        loader_module.warp_batch = warp
    rows = []
    for name in modes:
        median = sorted(runs[name], key=lambda r: r["samples_per_cpu_s"])[len(runs[name]) // 2]
        rows.append({"mode": name, **median, "all_samples_per_cpu_s": [r["samples_per_cpu_s"] for r in runs[name]]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def read_shards(url: str, storage: StorageOptions, cache_dir: str | None) -> None:
    """Read every shard as the loader does (verified, split into samples, cached if asked), no decoding."""
    manifest = read_manifest(url, storage)
    cfg = ReaderConfig(
        manifest=manifest, on_error="raise", storage=storage, cache_dir=cache_dir, cache_max_bytes=1 << 40
    )
    reader = ShardReader(cfg, [(i, list(range(s.num_samples))) for i, s in enumerate(manifest.shards)])
    reader.start()
    while (event := reader.events.get())[0] != "done":
        if event[0] == "error":
            raise event[1]


def cache_epochs(url: str, storage: StorageOptions, server_pid: int, args: argparse.Namespace) -> list[dict]:
    """Epoch 1 and 2 from S3 with and without the shard cache: whole pipeline, and reading alone."""
    rows = []
    for what in ("pipeline", "reading only"):
        for cached in (False, True):
            cache_dir = tempfile.mkdtemp(prefix="bench-cache-") if cached else None
            loader = None
            if what == "pipeline":
                loader = train_loader(url, storage, 0, args.img_size, args.batch_size, args.tasks, cache_dir=cache_dir)
            for epoch in (1, 2):
                cpu0, server0, start = cpu_seconds(), process_cpu(server_pid), time.perf_counter()
                if loader is not None:
                    n = sum(len(b["__key__"]) for b in loader)
                else:
                    read_shards(url, storage, cache_dir)
                    n = read_manifest(url, storage).num_samples
                seconds = time.perf_counter() - start
                rows.append(
                    {
                        "what": what,
                        "cache": cached,
                        "epoch": epoch,
                        "samples": n,
                        "epoch_s": round(seconds, 2),
                        "samples_per_s": round(n / seconds, 1),
                        "loader_cpu_s": round(cpu_seconds() - cpu0, 2),
                        "server_cpu_s": round(process_cpu(server_pid) - server0, 2),
                        "shards_from_cache": loader.stats["shards_from_cache"] if loader else None,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            if cache_dir:
                shutil.rmtree(cache_dir, ignore_errors=True)
    return rows


def read_only(url: str, storage: StorageOptions) -> dict:
    manifest = read_manifest(url, storage)
    start, cpu0, n, size = time.perf_counter(), cpu_seconds(), 0, 0
    for i in range(len(manifest.shards)):
        fs, path = url_to_fs(manifest.shard_url(i), storage)
        with fs.open(path, "rb", block_size=storage.block_size) as f:
            for _, members in iter_tar_samples(f):
                n += 1
                size += sum(len(v) for v in members.values())
    seconds = time.perf_counter() - start
    return {
        "samples_per_s": round(n / seconds, 1),
        "MB_per_s": round(size / seconds / 2**20, 1),
        "samples_per_cpu_s": round(n / (cpu_seconds() - cpu0), 1),
        "mean_sample_kB": round(size / n / 1024),
    }


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
        fs, _ = url_to_fs("s3://bench", s3)
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
                    runs[name].append(
                        run_epoch(
                            url,
                            storage,
                            workers,
                            args.img_size,
                            args.batch_size,
                            pid,
                            pin_memory=pin == "on",
                            device=device,
                            epochs=args.epochs,
                            tasks=args.tasks,
                        )
                    )
            for name in sources:
                median = sorted(runs[name], key=lambda r: r["samples_per_s"])[len(runs[name]) // 2]
                rows.append(
                    {
                        "source": name,
                        "workers": workers,
                        "pin_memory": pin == "on",
                        **median,
                        "all_samples_per_s": [r["samples_per_s"] for r in runs[name]],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sources", nargs="+", default=["local", "s3"], choices=("local", "s3"))
    parser.add_argument(
        "--pin-memory",
        nargs="+",
        default=["off"],
        choices=("off", "on"),
        help="run each setting with pageable (off) and/or pinned (on) batches",
    )
    parser.add_argument("--device", default=None, help="also copy every batch to this device (e.g. cuda)")
    parser.add_argument("--shard-size-mb", type=float, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per setting; the median is reported")
    parser.add_argument("--epochs", type=int, default=1, help="epochs read back to back in one measurement")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mtlora-data-bench"))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="PASCAL tasks to decode and augment")
    parser.add_argument(
        "--data-size",
        type=int,
        default=None,
        help="height of the synthetic images (default: --img-size; 2x shows the reduced decode)",
    )
    parser.add_argument("--levers", action="store_true", help="also measure the baseline and each speed lever")
    parser.add_argument(
        "--cache", action="store_true", help="also measure epochs 1 and 2 with/without the shard cache (S3)"
    )
    parser.add_argument("--skip-sources", action="store_true", help="skip the per-source/worker table")
    parser.add_argument(
        "--index", action="store_true", help="also compare ranged reads (the manifest's index) with whole shards"
    )
    parser.add_argument(
        "--device-split",
        action="store_true",
        help="also measure augment_device='device' on the CPU, and its decode-only share",
    )
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else None

    data_size = args.data_size or args.img_size
    root = os.path.join(args.work_dir, f"pascal-{data_size}")
    ensure_synthetic("pascal_context", root, args.num_samples, 0, seed=0, size=data_size)
    local = os.path.join(args.work_dir, f"shards-{data_size}-{args.num_samples}")
    if not os.path.isfile(os.path.join(local, "manifest.json")) or not read_manifest(local).indexed:
        shutil.rmtree(local, ignore_errors=True)  # absent, or written before the per-sample index
        convert("pascal_context", root, "train", local, shard_size_mb=args.shard_size_mb, workers=os.cpu_count() or 1)
    manifest = read_manifest(local)

    with contextlib.ExitStack() as stack:
        sources = {"local": (local, StorageOptions(), None)}
        if "s3" in args.sources:
            sources["s3"] = stack.enter_context(s3_source(local))
        sources = {name: sources[name] for name in args.sources}
        results: dict = {"read_only": {name: read_only(url, storage) for name, (url, storage, _) in sources.items()}}
        if args.levers:
            results["levers"] = levers(local, args)
        if args.device_split:
            results["device_split"] = device_split(local, args)
        if args.index:
            results["index"] = index_compare(local, args)
        if args.cache and "s3" in sources:
            results["cache"] = cache_epochs(*sources["s3"], args)
        results["epochs"] = [] if args.skip_sources else measure(sources, args, device)

    results["setup"] = {
        "command": " ".join(["python"] + sys.argv),
        "samples": manifest.num_samples,
        "shards": len(manifest.shards),
        "img_size": args.img_size,
        "data_size": data_size,
        "batch_size": args.batch_size,
        "epochs_per_measurement": args.epochs,
        "cpus": os.cpu_count(),
        "tasks": args.tasks,
        "load_average_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "device": str(device) if device else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if "levers" in results:
        _print_table(["pipeline", "samples/CPU-s (median)", "all runs", "vs baseline", "samples/s"],
                     [[r["pipeline"], r["samples_per_cpu_s"], r["all_samples_per_cpu_s"], f"{r['vs_baseline']}x",
                       r["samples_per_s"]] for r in results["levers"]])  # fmt: skip
    if "index" in results:
        _print_table(["reading", "samples/CPU-s (median)", "all runs", "vs before", "bytes read/epoch"],
                     [[r["reading"], r["samples_per_cpu_s"], r["all_samples_per_cpu_s"], f"{r['vs_before']}x",
                       r["bytes_read"]] for r in results["index"]])  # fmt: skip
    if "device_split" in results:
        _print_table(["augment_device='device'", "samples/CPU-s (median)", "all runs"],
                     [[r["mode"], r["samples_per_cpu_s"], r["all_samples_per_cpu_s"]] for r in results["device_split"]])  # fmt: skip
    if "cache" in results:
        _print_table(["what", "cache", "epoch", "epoch s", "samples/s", "loader CPU-s", "S3 server CPU-s",
                      "shards from cache"],
                     [[r["what"], "on" if r["cache"] else "off", r["epoch"], r["epoch_s"], r["samples_per_s"],
                       r["loader_cpu_s"], r["server_cpu_s"], r["shards_from_cache"]] for r in results["cache"]])  # fmt: skip
    _print_table(["source", "workers", "pinned", "samples/s (median)", "all runs", "epoch s", "samples/CPU-s",
                  "server CPU-s"],
                 [[r["source"], r["workers"], r["pin_memory"], r["samples_per_s"], r["all_samples_per_s"], r["epoch_s"],
                   r["samples_per_cpu_s"], r["server_cpu_s"]] for r in results["epochs"]])  # fmt: skip
    if set(sources) == {"local", "s3"} and results["epochs"]:
        rate = {(r["source"], r["workers"], r["pin_memory"]): r["samples_per_s"] for r in results["epochs"]}
        for workers, pin in sorted({(w, p) for _, w, p in rate}):
            print(
                f"workers={workers} pinned={pin}: s3 / local = {rate['s3', workers, pin] / rate['local', workers, pin]:.2f}"
            )


def _print_table(columns: list[str], rows: list[list]) -> None:
    """A Markdown table on stdout (``None`` cells as ``-``)."""
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join("-" if cell is None else str(cell) for cell in row) + " |")


if __name__ == "__main__":
    main()
