"""Convert a dataset on disk into webdataset shards in a folder or an ``s3://`` prefix.

Each shard is written with webdataset's ``TarWriter`` to a local temporary file, checksummed and indexed
(``shard_index``: the byte range and digest of each sample, so readers can range-read single samples), then
uploaded through fsspec (never through webdataset's ``ShardWriter``, whose opener is never closed so
upload errors vanish); a background thread uploads a shard while the next one is encoded. The manifest
goes last: a folder without ``manifest.json`` is an unfinished conversion, and a conversion about to
write shards deletes an existing one first so nobody streams a half-rewritten folder. Output is
byte-identical for the same input (see ``tarshards`` and ``encoding``).

At scale a split converts in parts (``part``/``num_parts``: processes, nodes, a SLURM array) and
resumably; each part journals its finished shards and the last one to finish merges the parts into
``manifest.json`` (see ``convert_parts``). A shard is closed before the sample that would push it past
the target size, so shard boundaries depend only on the ordered sample sizes: a resumed part starts
its next shard at the recorded id and writes what an uninterrupted run would have written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from mtlora_dist.data.errors import ShardError
from mtlora_dist.data.ingest.convert_parts import (
    PartJournal,
    PartLocation,
    begin_part,
    fingerprint,
    ids_digest,
    merge_parts,
    part_bounds,
)
from mtlora_dist.data.ingest.format_spec import DatasetFormat, register_format
from mtlora_dist.data.ingest.formats import READERS, get_reader
from mtlora_dist.data.ingest.labels import CLASS_NAMES
from mtlora_dist.data.shards.encoding import describe_encodings, encode_sample
from mtlora_dist.data.shards.shard_index import index_manifest, shard_info
from mtlora_dist.data.shards.tarshards import TarShardWriter, tar_size
from mtlora_dist.storage.fs import StorageOptions, is_remote, join, url_to_fs
from mtlora_dist.storage.retry import retry_call
from mtlora_dist.tasks.registry import get_dataset

__all__ = ["convert", "main", "merge_parts", "part_from_env"]

log = logging.getLogger(__name__)

Members = list[tuple[str, bytes]]
# (dataset, root, tasks, reader options): what a worker process needs to make its own reader
Context = tuple[str, str, tuple[str, ...], dict[str, Any]]

_WORKER_READER: dict[str, Any] = {}
_CHUNK = 4  # ids per task handed to a worker process
_IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker: bounded memory however long the split


def _reader_for(context: Context) -> Any:
    """The reader of ``context``, made once per process (a worker started by spawn registers the format)."""
    key = repr(context)
    reader = _WORKER_READER.get(key)
    if reader is None:
        dataset, root, tasks, options = context
        if options.get("fmt") is not None:
            register_format(dataset, options["fmt"])
        reader = _WORKER_READER[key] = get_reader(dataset, root, list(tasks), **options)
    return reader


def _encoded(context: Context, sample_id: str) -> tuple[str, Members]:
    """Read and encode one sample."""
    reader = _reader_for(context)
    sample = reader.read(sample_id)
    with open(reader.image_path(sample_id), "rb") as f:
        source = f.read()
    return sample_id, encode_sample(sample, reader.tasks, source_jpeg=source, optional=reader.optional_tasks)


def _encoded_chunk(context: Context, ids: Sequence[str]) -> list[tuple[str, Members]]:
    return [_encoded(context, i) for i in ids]


def _samples(context: Context, ids: Sequence[str], workers: int) -> Iterator[tuple[str, Members]]:
    """Encoded samples in ``ids`` order (the output stays deterministic), from ``workers`` processes with a
    bounded number of chunks queued, so a slow upload never piles up encoded samples in memory."""
    if workers <= 1:
        for sample_id in ids:
            yield _encoded(context, sample_id)
        return
    pool = ProcessPoolExecutor(workers)
    pending: deque[Future] = deque()
    try:
        for start in range(0, len(ids), _CHUNK):
            pending.append(pool.submit(_encoded_chunk, context, ids[start : start + _CHUNK]))
            if len(pending) >= _IN_FLIGHT_PER_WORKER * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _upload(local_path: str, url: str, storage: StorageOptions | None) -> None:
    fs, remote = url_to_fs(url, storage)
    retry_call(lambda: fs.put_file(local_path, remote), url=url, options=storage)


class _ShardCommitter:
    """Uploads finished shards and records each in the part's journal, in order, on one background thread:
    the next shard is encoded while the last one uploads, and the journal never lists a shard that is not
    stored (a shard stored but not yet recorded when the process dies is written again, with the same bytes)."""

    def __init__(self, loc: PartLocation, journal: PartJournal) -> None:
        self.loc, self.journal = loc, journal
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-upload")
        self._pending: Future | None = None
        self._start, self._first_id = time.monotonic(), journal.next_id

    def submit(self, writer: TarShardWriter, missing: Mapping[str, int]) -> None:
        writer.close()
        self.wait()  # one upload in flight at most: local temporary files stay at two shards
        self._pending = self._pool.submit(self._commit, writer.path, writer.num_samples, dict(missing))

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _commit(self, path: str, num_samples: int, missing: dict[str, int]) -> None:
        name, journal = os.path.basename(path), self.journal
        url = join(self.loc.out_url, name)
        info = shard_info(path, name)  # size, sha256 and the per-sample index readers range-read with
        if info.num_samples != num_samples:
            raise ShardError(f"{path}: wrote {num_samples} samples, the tar holds {info.num_samples}")
        _upload(path, url, self.loc.storage)
        journal.shards.append(info)
        journal.next_id += num_samples
        for task, count in missing.items():
            journal.labels_missing[task] = journal.labels_missing.get(task, 0) + count
        self.loc.write_journal(journal)
        os.remove(path)
        rate = (journal.next_id - self._first_id) / max(time.monotonic() - self._start, 1e-9)
        log.info(
            "wrote %s (%d samples; part %d/%d at %d of %d ids, %.1f img/s)",
            url, num_samples, self.loc.part, self.loc.num_parts, journal.next_id, journal.num_ids, rate,
        )  # fmt: skip

    def __enter__(self) -> _ShardCommitter:
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        try:
            if exc_type is None:
                self.wait()
            elif self._pending is not None:
                self._pending.exception()  # let the upload in flight finish; the error in hand wins
        finally:
            self._pool.shutdown(wait=True)


def _write_part(loc: PartLocation, journal: PartJournal, ids: Sequence[str], context: Context, workers: int) -> None:
    """Encode ``ids`` (the part's ids from ``journal.next_id`` on) into shards, journaling each one."""
    target = journal.fingerprint["shard_size_bytes"]
    optional = journal.header["optional_tasks"]
    index = len(journal.shards)
    with (
        tempfile.TemporaryDirectory(prefix="mtlora-convert-") as tmp,
        _ShardCommitter(loc, journal) as committer,
        contextlib.closing(_samples(context, ids, workers)) as samples,
    ):
        writer: TarShardWriter | None = None
        missing = dict.fromkeys(optional, 0)
        for key, members in samples:
            if writer is not None and writer.size + tar_size(dict(members)) > target:
                committer.submit(writer, missing)
                writer, missing = None, dict.fromkeys(optional, 0)
            if writer is None:
                writer, index = TarShardWriter(os.path.join(tmp, loc.shard_name(index))), index + 1
            writer.add(key, members)
            stored = {suffix.split(".")[0] for suffix, _ in members}
            for task in missing:
                missing[task] += task not in stored
        if writer is not None:
            committer.submit(writer, missing)


def _open_reader(
    dataset: str, root: str, tasks: list[str] | None, split: str, db_info: str | None, fmt: DatasetFormat | None
) -> tuple[Any, dict[str, Any]]:
    """The dataset's reader and the options that make it (sent to worker processes)."""
    if fmt is not None:
        register_format(dataset, fmt)
        options: dict[str, Any] = {"fmt": fmt, "split": split}
    else:
        options = {"db_info": db_info} if db_info else {}
    return get_reader(dataset, root, tasks, **options), options


def _fresh_journal(
    dataset: str, reader: Any, split: str, ids: Sequence[str], target: int, loc: PartLocation, options: dict
) -> PartJournal:
    """The record of a part that has not started: settings, its slice of ``ids``, the manifest's header."""
    tasks = list(reader.tasks)
    start, stop = part_bounds(len(ids), loc.part, loc.num_parts)
    header = {
        "dataset": dataset,
        "split": split,
        "tasks": tasks,
        "num_outputs": {t: get_dataset(dataset).num_outputs[t] for t in tasks},
        "class_names": {t: list(n) for t, n in _class_names(dataset).items() if t in tasks},
        "encodings": describe_encodings(tasks),
        "optional_tasks": list(reader.optional_tasks),
    }
    return PartJournal(
        part=loc.part,
        num_parts=loc.num_parts,
        fingerprint=fingerprint(dataset, split, tasks, target, loc.num_parts, ids, options),
        ids={"start": start, "stop": stop, "sha256": ids_digest(ids[start:stop])},
        header=header,
        labels_missing=dict.fromkeys(reader.optional_tasks, 0),
    )


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
    *,
    part: int = 0,
    num_parts: int = 1,
    resume: bool = False,
) -> dict[str, Any]:
    """Write ``split`` of the dataset at ``root`` as shards of about ``shard_size_mb`` to ``out_url``.

    ``fmt``: the declaration of a dataset that is not built in (a data config's ``format``).
    ``part``/``num_parts``: convert only that contiguous slice of the split's ids (merged into
    ``manifest.json`` by the last part to finish). ``resume=False`` (what ``--restart`` asks for) starts
    this part over; ``True`` (the command line's default) goes on from its journal, does nothing for a
    part already converted, and raises :class:`ConversionMismatchError` when the folder holds a
    conversion with other settings. Returns the manifest as a dict, or, while other parts are still
    unfinished, this part's record (a dict with ``part``, ``num_parts``, ``complete``, ``shards``).
    """
    part_bounds(0, part, num_parts)  # a wrong part number fails before the ids are listed
    reader, options = _open_reader(dataset, root, tasks, split, db_info, fmt)
    ids = reader.ids(split)
    if not ids:
        raise ValueError(f"split '{split}' of {root} lists no samples")
    loc = PartLocation(str(out_url).rstrip("/"), split, part, num_parts, storage)
    fresh = _fresh_journal(dataset, reader, split, ids, int(shard_size_mb * 1024 * 1024), loc, options)
    journal = begin_part(loc, fresh, resume)
    if journal is None:
        log.info("%s is already converted (manifest.json): nothing rewritten", loc.out_url)
        return _stored_manifest(loc)
    if journal.complete:
        log.info("%s: part %d of %d is already converted: nothing rewritten", loc.out_url, part, num_parts)
    else:
        _start_writing(loc, journal)
        context: Context = (dataset, str(root), tuple(reader.tasks), options)
        _write_part(loc, journal, ids[journal.ids["start"] + journal.next_id : journal.ids["stop"]], context, workers)
        journal.complete = True
        loc.write_journal(journal)
    merged = merge_parts(loc.out_url, storage, num_parts, required=False)
    if merged is None:
        return json.loads(journal.to_json())
    if num_parts == 1:
        loc.forget()
    return merged


def _start_writing(loc: PartLocation, journal: PartJournal) -> None:
    """Before the first shard: no manifest.json (nobody streams a folder being written), the folder, and a
    journal (a part killed before its first shard is still recognised, and refused with other settings)."""
    loc.remove_manifest()
    if not is_remote(loc.out_url):
        os.makedirs(url_to_fs(loc.out_url)[1], exist_ok=True)
    loc.write_journal(journal)


def _stored_manifest(loc: PartLocation) -> dict[str, Any]:
    fs, path = url_to_fs(loc.manifest_url, loc.storage)
    return json.loads(retry_call(lambda: fs.cat_file(path), url=loc.manifest_url, options=loc.storage))


def _class_names(dataset: str) -> dict[str, tuple[str, ...]]:
    return dict(CLASS_NAMES.get(dataset) or get_dataset(dataset).class_names)


# ------------------------------------------------------------------------------------------ command line
Resolver = Callable[[str], tuple[str, DatasetFormat | None]]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/convert.py",
        description=(
            "Convert a dataset on disk into webdataset shards + manifest.json, in parts and resumably "
            "(docs/data.md, 'Conversion at scale'). Merge mode: launch/convert.py --merge --out URL; "
            "adding the per-sample index to an older conversion: launch/convert.py --index --out URL."
        ),
    )
    parser.add_argument(
        "dataset",
        nargs="?",
        help=f"built-in {sorted(READERS)}, or a data config with a 'format:' section (name in configs/data/ or YAML path)",
    )
    parser.add_argument("--root", help="dataset root folder")
    parser.add_argument("--split", help="split name, e.g. train or val")
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix (one split per folder)")
    parser.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size (default 256)")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to store (default: all of the dataset)")
    parser.add_argument("--workers", type=int, default=1, help="processes reading and encoding samples")
    parser.add_argument("--part", type=int, default=None, help="convert this part (0-based) of --num-parts")
    parser.add_argument(
        "--num-parts", type=int, default=None, help="parts the split is cut into (default 1, or the SLURM array's)"
    )
    parser.add_argument("--restart", action="store_true", help="delete this part's journal and shards, start over")
    parser.add_argument(
        "--merge", action="store_true", help="only merge the finished parts' records into manifest.json"
    )
    parser.add_argument(
        "--index",
        action="store_true",
        help="only add the per-sample byte index to a manifest.json written without one (reads each shard once)",
    )
    parser.add_argument("--db-info", default=None, help="PASCAL: folder with context_classes.json, nyu_classes.json")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    return parser


def part_from_env(part: int | None, num_parts: int | None, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """``(part, num_parts)``: as given, else from a SLURM array task (its index from the array's first
    one, and the array's size), else ``(0, 1)``."""
    if (part is None) != (num_parts is None):
        raise ValueError("give --part and --num-parts together (or neither: one part, or the SLURM array's task)")
    if part is not None and num_parts is not None:
        return part, num_parts
    if env.get("SLURM_ARRAY_TASK_ID"):
        task, first = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        if not 0 <= task - first < count:
            raise ValueError(
                f"SLURM array task {task} is not within {first}..{first + count - 1}: use a contiguous --array "
                "range (e.g. --array=0-15), or pass --part and --num-parts"
            )
        return task - first, count
    return 0, 1


def _dataset(name: str, resolve: Resolver | None) -> tuple[str, DatasetFormat | None]:
    if name in READERS:
        return name, None
    if resolve is None:
        raise ValueError(f"unknown dataset '{name}'; built-in datasets: {sorted(READERS)}")
    return resolve(name)


def main(argv: list[str] | None = None, resolve: Resolver | None = None) -> dict[str, Any]:
    """The command line. ``resolve`` turns a dataset name that is not built in into ``(dataset, format)``
    (``launch/convert.py`` reads data configs with it: this package does not import the config layer)."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    storage = StorageOptions(endpoint_url=args.endpoint_url)
    if args.merge:
        manifest = merge_parts(args.out, storage)
        print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shard(s) -> {args.out}")
        return manifest
    if args.index:
        indexed = index_manifest(args.out, storage)
        print(f"{indexed.num_samples} samples in {len(indexed.shards)} shard(s) indexed -> {args.out}")
        return json.loads(indexed.to_json())
    missing = [flag for flag, value in (("DATASET", args.dataset), ("--root", args.root), ("--split", args.split))
               if not value]  # fmt: skip
    if missing:
        parser.error(f"converting needs {', '.join(missing)} (or --merge to merge finished parts)")
    part, num_parts = part_from_env(args.part, args.num_parts)
    dataset, fmt = _dataset(args.dataset, resolve)
    result = convert(
        dataset,
        args.root,
        args.split,
        args.out,
        args.shard_size_mb,
        args.tasks,
        storage,
        args.workers,
        args.db_info,
        fmt,
        part=part,
        num_parts=num_parts,
        resume=not args.restart,
    )
    if "part" in result:
        print(
            f"part {part} of {num_parts}: {sum(s['num_samples'] for s in result['shards'])} samples in "
            f"{len(result['shards'])} shard(s) -> {args.out}; the last part to finish writes manifest.json"
        )
    else:
        print(f"{result['num_samples']} samples in {len(result['shards'])} shard(s) -> {args.out}")
    return result
