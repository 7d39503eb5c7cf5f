"""The loader from object storage with a request latency: samples/s with and without 50 ms per request,
and the requests and bytes the server received.

    python benchmarks/data_latency.py [--num-samples 256] [--img-size 448] [--workers 2] [--delay-ms 0 50]
        [--buffer-mb 256] [--concurrency 8] [--repeats 3] [--json out.json]

Makes the synthetic PASCAL-Context set of ``benchmarks/data_throughput.py`` (images about ``--img-size``
pixels high, converted to indexed shards), serves it from ``rclone serve s3`` on 127.0.0.1
(``tests/s3_server.py``) behind the loopback proxy of ``tests/latency_proxy.py``, which holds every
request ``--delay-ms`` before passing it on and logs each request the server receives (method, range,
body bytes of the answer). One training epoch per setting, settings alternating within each repeat so
that drift in the machine's load hits all; the median is reported:

* ``samples/s``: from the first batch to the last (worker start-up excluded); ``vs no delay``: the
  ratio to the row without delay (the target: >= 0.8 at 50 ms with 2 workers);
* ``GET/sample``, ``HEAD``: requests the server received during the epoch per sample delivered, and
  HEAD requests (sizes come from the manifest: none); ``bytes x``: body bytes the server sent over the
  bytes of the samples used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "benchmarks")]

from mtlora_dist.data import build_loader  # noqa: E402
from mtlora_dist.data.config import BatchGeometry, DataConfig, DataWorld, ReadConfig  # noqa: E402
from mtlora_dist.data.ingest.convert import convert  # noqa: E402
from mtlora_dist.data.shards.manifest import read_manifest  # noqa: E402
from mtlora_dist.storage.fs import StorageOptions, url_to_fs  # noqa: E402
from mtlora_dist.synthetic.datasets import ensure_synthetic  # noqa: E402

from common import emit  # noqa: E402
from latency_proxy import LatencyProxy  # noqa: E402
from s3_server import KEY, SECRET, S3Server  # noqa: E402

TASKS = ["semseg", "human_parts", "sal", "normals"]


@contextlib.contextmanager
def served(local: str):
    """``local``'s shards in a bucket of a loopback S3 server; yields the server."""
    os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")  # rclone's ranged reads
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    server_dir = tempfile.mkdtemp(prefix="bench-latency-")
    server = S3Server("rclone", Path(server_dir) / "data").start()
    try:
        server.make_bucket("bench")
        fs, _ = url_to_fs("s3://bench", StorageOptions(endpoint_url=server.endpoint, key=KEY, secret=SECRET))
        for name in sorted(os.listdir(local)):
            fs.put_file(os.path.join(local, name), f"bench/pascal/{name}")
        yield server
    finally:
        server.stop()
        shutil.rmtree(server_dir, ignore_errors=True)


def epoch(proxy: LatencyProxy, args: argparse.Namespace, used_bytes: int) -> dict:
    """One training epoch through ``proxy``: rate, and what the server received during it."""
    storage = StorageOptions(endpoint_url=proxy.endpoint, key=KEY, secret=SECRET)
    data = DataConfig(
        dataset="pascal_context",
        tasks=list(TASKS),
        batch_size=args.batch_size,
        storage=storage,
        read=ReadConfig(buffer_mb=args.buffer_mb, concurrency=args.concurrency),
    )
    world = DataWorld(num_workers=args.workers)
    geometry = BatchGeometry(args.batch_size)
    loader = build_loader("s3://bench/pascal", "train", data, world, geometry, img_size=(args.img_size,) * 2, seed=0)
    assert loader.unused_per_epoch == 0, "choose --num-samples as a multiple of --batch-size"
    proxy.reset()  # the manifest's requests are not the epoch's
    start, first, n, n_first = time.perf_counter(), None, 0, 0
    for batch in loader:
        n += len(batch["__key__"])
        if first is None:
            first, n_first = time.perf_counter(), n
    end = time.perf_counter()
    loader.close()
    requests = proxy.reset()
    stats = loader.stats
    assert stats["samples_missing"] == stats["samples_skipped"] == 0, stats
    gets = [r for r in requests if r.method == "GET"]
    return {
        "samples": n,
        "samples_per_s": round((n - n_first) / (end - first), 1),
        "epoch_s": round(end - start, 2),
        "GET": len(gets),
        "HEAD": sum(r.method == "HEAD" for r in requests),
        "other_requests": sum(r.method not in ("GET", "HEAD") for r in requests),
        "GET_per_sample": round(len(gets) / n, 3),
        "bytes_x": round(sum(r.body_bytes for r in gets) / used_bytes, 4),
        "held_peak_bytes": stats.get("read_held_peak", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--delay-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--buffer-mb", type=float, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--shard-size-mb", type=float, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mtlora-data-bench"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    root = os.path.join(args.work_dir, f"pascal-{args.img_size}")
    ensure_synthetic("pascal_context", root, args.num_samples, 0, seed=0, size=args.img_size)
    local = os.path.join(args.work_dir, f"shards-{args.img_size}-{args.num_samples}")
    if not os.path.isfile(os.path.join(local, "manifest.json")) or not read_manifest(local).indexed:
        shutil.rmtree(local, ignore_errors=True)
        convert("pascal_context", root, "train", local, shard_size_mb=args.shard_size_mb, workers=os.cpu_count() or 1)
    manifest = read_manifest(local)
    used = sum(s.offsets[-1] - s.offsets[0] for s in manifest.shards)

    runs: dict[float, list[dict]] = {d: [] for d in args.delay_ms}
    with served(local) as server:
        proxies = {d: LatencyProxy(server.port, d / 1000).start() for d in args.delay_ms}
        try:
            for _ in range(args.repeats):
                for delay, proxy in proxies.items():
                    runs[delay].append(epoch(proxy, args, used))
                    print(json.dumps({"delay_ms": delay, **runs[delay][-1]}), flush=True)
        finally:
            for proxy in proxies.values():
                proxy.stop()
    rows = []
    for delay in args.delay_ms:
        median = sorted(runs[delay], key=lambda r: r["samples_per_s"])[len(runs[delay]) // 2]
        rows.append({"delay_ms": delay, **median, "all_samples_per_s": [r["samples_per_s"] for r in runs[delay]]})
    for row in rows:
        row["vs_no_delay"] = round(row["samples_per_s"] / rows[0]["samples_per_s"], 2)
    print(f"\n{args.workers} workers, buffer {args.buffer_mb} MB, {args.concurrency} reads in flight per worker")
    print("| delay per request | samples/s (repeats) | vs no delay | GET/sample | HEAD | bytes x | epoch s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['delay_ms']:g} ms | {r['samples_per_s']} ({', '.join(map(str, r['all_samples_per_s']))}) | "
            f"{r['vs_no_delay']} | {r['GET_per_sample']} | {r['HEAD']} | {r['bytes_x']} | {r['epoch_s']} |"
        )
    setup = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), **vars(args)}
    emit({"rows": rows, "setup": setup}, args.json)


if __name__ == "__main__":
    main()
