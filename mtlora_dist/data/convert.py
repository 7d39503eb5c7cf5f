"""Convert a dataset on disk into webdataset shards in a folder or an ``s3://`` prefix.

Each shard is written with webdataset's ``TarWriter`` to a local temporary file, checksummed, then
uploaded through fsspec (never through webdataset's ``ShardWriter``, whose opener is never closed so
upload errors vanish). The manifest goes last: a folder without ``manifest.json`` is an unfinished
conversion. An existing manifest is deleted first so nobody streams a half-rewritten folder. Output
is byte-identical for the same input (see ``tarshards`` and ``encoding``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from mtlora_dist.data.encoding import describe_encodings, encode_sample
from mtlora_dist.data.format_spec import DatasetFormat, register_format
from mtlora_dist.data.formats import READERS, get_reader
from mtlora_dist.data.labels import CLASS_NAMES
from mtlora_dist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo
from mtlora_dist.data.tarshards import TarShardWriter, tar_size
from mtlora_dist.storage.atomic import atomic_write
from mtlora_dist.storage.fs import StorageOptions, join, url_to_fs
from mtlora_dist.storage.retry import retry_call
from mtlora_dist.tasks.registry import get_dataset

__all__ = ["convert", "main"]

log = logging.getLogger(__name__)

_WORKER_READER: dict[tuple, Any] = {}


def _encoded(args: tuple[str, str, tuple[str, ...], dict[str, Any], str]) -> tuple[str, list[tuple[str, bytes]]]:
    """Read and encode one sample (runs in a worker process when ``workers > 1``)."""
    dataset, root, tasks, reader_kwargs, sample_id = args
    key = repr((dataset, root, tasks, sorted(reader_kwargs.items())))
    reader = _WORKER_READER.get(key)
    if reader is None:
        if reader_kwargs.get("fmt") is not None:  # a worker started by spawn has an empty registry
            register_format(dataset, reader_kwargs["fmt"])
        reader = _WORKER_READER[key] = get_reader(dataset, root, list(tasks), **reader_kwargs)
    sample = reader.read(sample_id)
    with open(reader.image_path(sample_id), "rb") as f:
        source = f.read()
    return sample_id, encode_sample(sample, reader.tasks, source_jpeg=source, optional=reader.optional_tasks)


def _samples(jobs: list[tuple], workers: int) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    if workers <= 1:
        yield from map(_encoded, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:  # map keeps input order: output stays deterministic
        yield from pool.map(_encoded, jobs, chunksize=4)


def convert(
    dataset: str,
    root: str,
    split: str,
    out_url: str,
    shard_size_mb: float = 256.0,
    tasks: list[str] | None = None,
    storage: StorageOptions | None = None,
    workers: int = 1,
    db_info: str | None = None,
    fmt: DatasetFormat | None = None,
) -> dict[str, Any]:
    """Write ``split`` of the dataset at ``root`` as shards of about ``shard_size_mb`` to ``out_url``.

    ``fmt``: the declaration of a dataset that is not built in (a data config's ``format``). Returns the
    manifest as a dict. A shard is closed before the sample that would push it past the target size (a
    single larger sample still gets a shard of its own).
    """
    if fmt is not None:
        register_format(dataset, fmt)
        reader_kwargs: dict[str, Any] = {"fmt": fmt, "split": split}
    else:
        reader_kwargs = {"db_info": db_info} if db_info else {}
    reader = get_reader(dataset, root, tasks, **reader_kwargs)
    tasks = list(reader.tasks)
    ids = reader.ids(split)
    if not ids:
        raise ValueError(f"split '{split}' of {root} lists no samples")
    out_url = str(out_url).rstrip("/")
    fs, out_path = url_to_fs(out_url, storage)
    manifest_path = url_to_fs(join(out_url, MANIFEST_NAME), storage)[1]
    if fs.exists(manifest_path):
        fs.rm(manifest_path)
    if not out_url.startswith("s3://"):
        fs.makedirs(out_path, exist_ok=True)

    target = int(shard_size_mb * 1024 * 1024)
    shards: list[ShardInfo] = []
    missing = dict.fromkeys(reader.optional_tasks, 0)
    jobs = [(dataset, str(root), tuple(tasks), reader_kwargs, i) for i in ids]
    with tempfile.TemporaryDirectory(prefix="mtlora-convert-") as tmp:
        writer: TarShardWriter | None = None

        def finish(w: TarShardWriter) -> None:
            w.close()
            name = os.path.basename(w.path)
            digest = hashlib.sha256()
            with open(w.path, "rb") as f:
                while block := f.read(8 << 20):
                    digest.update(block)
            remote_url = join(out_url, name)
            remote = url_to_fs(remote_url, storage)[1]
            retry_call(lambda: fs.put_file(w.path, remote), url=remote_url, options=storage)
            shards.append(ShardInfo(name, w.num_samples, os.path.getsize(w.path), digest.hexdigest()))
            os.remove(w.path)
            log.info("wrote %s (%d samples)", remote_url, w.num_samples)

        for key, members in _samples(jobs, workers):
            stored = {suffix.split(".")[0] for suffix, _ in members}
            for task in missing:
                missing[task] += task not in stored
            if writer is not None and writer.size + tar_size(dict(members)) > target:
                finish(writer)
                writer = None
            if writer is None:
                writer = TarShardWriter(os.path.join(tmp, f"{split}-{len(shards):06d}.tar"))
            writer.add(key, members)
        assert writer is not None
        finish(writer)

    manifest = Manifest(
        dataset=dataset,
        split=split,
        tasks=tasks,
        num_outputs={t: get_dataset(dataset).num_outputs[t] for t in tasks},
        class_names={t: list(n) for t, n in _class_names(dataset).items() if t in tasks},
        encodings=describe_encodings(tasks),
        shards=shards,
        optional_tasks=list(reader.optional_tasks),
        labels_missing=missing,
    )
    text = manifest.to_json()
    manifest_url = join(out_url, MANIFEST_NAME)  # written last and atomically: readers never see half a manifest
    retry_call(lambda: atomic_write(manifest_url, text.encode(), storage), url=manifest_url, options=storage)
    return json.loads(text)


def _class_names(dataset: str) -> dict[str, tuple[str, ...]]:
    return dict(CLASS_NAMES.get(dataset) or get_dataset(dataset).class_names)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="launch/convert.py",
        description="Convert PASCAL-Context or NYUD-v2 (on-disk MTL layout) into webdataset shards + manifest.json.",
    )
    parser.add_argument("dataset", choices=sorted(READERS))
    parser.add_argument("--root", required=True, help="dataset root folder")
    parser.add_argument("--split", required=True, help="split name, e.g. train or val")
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix (one split per folder)")
    parser.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size (default 256)")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to store (default: all of the dataset)")
    parser.add_argument("--workers", type=int, default=1, help="processes reading and encoding samples")
    parser.add_argument("--db-info", default=None, help="PASCAL: folder with context_classes.json, nyu_classes.json")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    storage = StorageOptions(endpoint_url=args.endpoint_url)
    manifest = convert(args.dataset, args.root, args.split, args.out, args.shard_size_mb, args.tasks, storage,
                       args.workers, args.db_info)
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shard(s) -> {args.out}")
    return manifest
