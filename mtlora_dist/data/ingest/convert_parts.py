"""Parts of a conversion: their records (resume journals) and the merge into one ``manifest.json``.

A split's id list is cut into ``num_parts`` contiguous parts that convert independently (one process
each: on one machine, or the tasks of a SLURM array over nodes). Part ``i`` writes shards named
``{split}-p{i:05d}-of-{N:05d}-{n:06d}.tar`` (a single-part conversion keeps ``{split}-{n:06d}.tar``), so
parts, and conversions into another number of parts, never overwrite each other's shards, and records
itself in ``_parts/part-{i:05d}-of-{N:05d}.json``: the settings it runs with (the fingerprint), its
finished shards and the index of its next id. The record is rewritten atomically after every finished
shard, which makes it the journal a killed part resumes from, and once ``complete`` it is the part's
share of the manifest. The last part to complete merges every part's record, in part order, into
``manifest.json``; the merge is deterministic, so two parts merging at once write the same bytes.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mtlora_dist.data.shards.encoding import ENCODING_VERSION
from mtlora_dist.data.shards.manifest import MANIFEST_NAME, Manifest, ShardInfo, dumps_with_shards
from mtlora_dist.storage.atomic import atomic_write
from mtlora_dist.storage.fs import StorageOptions, is_remote, join, url_to_fs
from mtlora_dist.storage.retry import retry_call

__all__ = [
    "PARTS_DIR",
    "ConversionMismatchError",
    "PartJournal",
    "PartLocation",
    "begin_part",
    "differences",
    "fingerprint",
    "merge_parts",
    "part_bounds",
]

log = logging.getLogger(__name__)

PARTS_DIR = "_parts"
JOURNAL_FORMAT = "mtlora-dist/convert-part"
_JOURNAL_NAME = re.compile(r"part-(\d{5})-of-(\d{5})\.json$")
_RESTART_HINT = (
    "to start this part over, pass --restart (resume=False in Python: deletes the part's record and shards), "
    "or write to another --out"
)
# what a difference in a hashed setting means, for the error message
_HASHED = {
    "ids_sha256": "the split lists other samples",
    "format_sha256": "the data config's format: section changed",
}


class ConversionMismatchError(ValueError):
    """A folder holds (part of) a conversion with other settings than the one asked for."""


def part_bounds(num_ids: int, part: int, num_parts: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``part``'s ids: contiguous, in order, sizes differing by at most one."""
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"part {part} of {num_parts}: need num_parts >= 1 and 0 <= part < num_parts")
    return part * num_ids // num_parts, (part + 1) * num_ids // num_parts


def ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def fingerprint(
    dataset: str,
    split: str,
    tasks: Sequence[str],
    shard_size_bytes: int,
    num_parts: int,
    ids: Sequence[str],
    reader_options: dict[str, Any],
) -> dict[str, Any]:
    """The settings that decide every part's bytes; parts merge (and a part resumes) only when equal.

    ``reader_options``: what else changes the samples (PASCAL's ``db_info``, a declared ``format``, hashed).
    The dataset root is left out on purpose: nodes may mount the same data at other paths."""
    options = {k: v for k, v in reader_options.items() if k != "fmt" and v is not None}
    if reader_options.get("fmt") is not None:
        text = json.dumps(asdict(reader_options["fmt"]), sort_keys=True, default=str)
        options["format_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return {
        "dataset": dataset,
        "split": split,
        "tasks": list(tasks),
        "shard_size_bytes": int(shard_size_bytes),
        "num_parts": num_parts,
        "encoding_version": ENCODING_VERSION,
        "num_ids": len(ids),
        "ids_sha256": ids_digest(ids),
        **options,
    }


def differences(
    recorded: dict[str, Any], wanted: dict[str, Any], recorded_at: str = "in the folder", wanted_at: str = "here"
) -> list[str]:
    """``key: <recorded> <recorded_at>, <wanted> <wanted_at>`` for every key whose value differs."""
    out = []
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key, "<absent>"), wanted.get(key, "<absent>")
        if old != new:
            hint = f" ({_HASHED[key]})" if key in _HASHED else ""
            out.append(f"{key}: {_short(old)} {recorded_at}, {_short(new)} {wanted_at}{hint}")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text[:15] + "...'" if isinstance(value, str) and len(value) == 64 else text


@dataclass
class PartJournal:
    """One part's record: its settings, its slice of the ids, and the shards it has finished."""

    part: int
    num_parts: int
    fingerprint: dict[str, Any]  # shared by every part of the conversion
    ids: dict[str, Any]  # this part's slice: start, stop (indices in the split's list), sha256
    header: dict[str, Any]  # manifest fields other than shards and counts: the merge needs no dataset
    shards: list[ShardInfo] = field(default_factory=list)
    labels_missing: dict[str, int] = field(default_factory=dict)  # over the finished shards
    next_id: int = 0  # index in the part of the first id that no finished shard holds
    complete: bool = False
    format: str = JOURNAL_FORMAT

    @property
    def num_ids(self) -> int:
        return self.ids["stop"] - self.ids["start"]

    def to_json(self) -> str:
        return dumps_with_shards(asdict(self))

    @classmethod
    def from_json(cls, text: str, url: str) -> PartJournal:
        try:
            data = json.loads(text)
            if data.get("format") != JOURNAL_FORMAT:
                raise ValueError(f"format={data.get('format')!r}")
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            return cls(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ConversionMismatchError(
                f"{url} is not a part record this code reads ({err}); {_RESTART_HINT}"
            ) from None

    def settings(self) -> dict[str, Any]:
        """What must match for a resume: the shared fingerprint plus this part's slice."""
        return {**self.fingerprint, "part": self.part, "part_ids": self.ids}


@dataclass(frozen=True)
class PartLocation:
    """Where part ``part`` of ``num_parts`` of a conversion into ``out_url`` keeps its shards and record."""

    out_url: str
    split: str
    part: int = 0
    num_parts: int = 1
    storage: StorageOptions | None = None

    @property
    def journal_url(self) -> str:
        return _journal_url(self.out_url, self.part, self.num_parts)

    @property
    def manifest_url(self) -> str:
        return join(self.out_url, MANIFEST_NAME)

    def shard_name(self, index: int) -> str:
        if self.num_parts == 1:
            return f"{self.split}-{index:06d}.tar"
        return f"{self.split}-p{self.part:05d}-of-{self.num_parts:05d}-{index:06d}.tar"

    def read_journal(self) -> PartJournal | None:
        return read_journal(self.journal_url, self.storage)

    def write_journal(self, journal: PartJournal) -> None:
        _write(self.journal_url, journal.to_json(), self.storage)

    def other_conversions(self) -> dict[int, list[str]]:
        """Record URLs in the folder of conversions into another number of parts, by that number."""
        found: dict[int, list[str]] = {}
        for (_, n), url in sorted(list_journals(self.out_url, self.storage).items()):
            if n != self.num_parts:
                found.setdefault(n, []).append(url)
        return found

    def remove_manifest(self) -> None:
        _remove(self.manifest_url, self.storage)

    def discard(self) -> None:
        """What ``--restart`` deletes before the part starts again: ``manifest.json`` (nobody streams a
        folder being rewritten), this part's record and shards, and the records and shards of an earlier
        conversion into another number of parts (their names cannot be this conversion's)."""
        self.remove_manifest()
        stale = [self.journal_url] + [u for urls in self.other_conversions().values() for u in urls]
        for url in stale:
            journal = read_journal(url, self.storage)
            for shard in journal.shards if journal else []:
                _remove(join(self.out_url, shard.name), self.storage)
            _remove(url, self.storage)
        for name in self._own_shards_on_storage():  # also those finished but never recorded
            _remove(join(self.out_url, name), self.storage)

    def forget(self) -> None:
        """Delete the record of a single-part conversion once merged: its folder then holds only the shards
        and ``manifest.json``, as it always has."""
        _remove(self.journal_url, self.storage)
        if is_remote(self.out_url):
            return  # an object store has no folders to remove
        folder = url_to_fs(join(self.out_url, PARTS_DIR))[1]
        name = self.journal_url.rsplit("/", 1)[1]
        for leftover in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
            os.remove(leftover)  # atomic_write's temporary file of a run killed while it wrote the journal
        with contextlib.suppress(OSError):  # not empty: records of other parts
            os.rmdir(folder)

    def _own_shards_on_storage(self) -> list[str]:
        prefix = self.shard_name(0)[: -len("000000.tar")]
        pattern = re.compile(re.escape(prefix) + r"\d{6}\.tar")
        return [n for n in _list_names(self.out_url, self.storage) if pattern.fullmatch(n)]


def begin_part(loc: PartLocation, fresh: PartJournal, resume: bool) -> PartJournal | None:
    """The record this run goes on from: ``fresh`` for a new start (after ``--restart``'s deletions when not
    ``resume``), the stored one when resuming; ``None`` when the folder's ``manifest.json`` already is this
    single-part conversion (its record is folded into the manifest). Raises
    :class:`ConversionMismatchError` naming what differs when the folder holds another conversion."""
    if not resume:
        loc.discard()
        return fresh
    where = f"{loc.out_url} (part {loc.part} of {loc.num_parts})"
    others = loc.other_conversions()
    if others:
        raise ConversionMismatchError(
            f"{where}: the folder holds part records of a conversion into {sorted(others)} part(s), not "
            f"{loc.num_parts}; {_RESTART_HINT}"
        )
    recorded = loc.read_journal()
    if recorded is not None:
        diffs = differences(recorded.settings(), fresh.settings())
        if diffs:
            raise ConversionMismatchError(
                f"{where} was started with other settings: {'; '.join(diffs)}; {_RESTART_HINT}"
            )
        return recorded
    text = _read_text(loc.manifest_url, loc.storage)
    if text is None:
        return fresh
    if loc.num_parts > 1:
        raise ConversionMismatchError(f"{where}: the folder already holds a converted {MANIFEST_NAME}; {_RESTART_HINT}")
    diffs = differences(_visible_settings(json.loads(text)), _visible_settings(fresh.header | fresh.fingerprint))
    if diffs:
        raise ConversionMismatchError(
            f"{where}: {MANIFEST_NAME} was converted with other settings: {'; '.join(diffs)}; {_RESTART_HINT}"
        )
    return None


def _visible_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The settings a merged single-part ``manifest.json`` still shows (its record is gone)."""
    return {
        "dataset": data["dataset"],
        "split": data["split"],
        "tasks": data["tasks"],
        "encoding_version": data["encoding_version"],
        "num_samples": data.get("num_samples", data.get("num_ids")),
    }


def _journal_url(out_url: str, part: int, num_parts: int) -> str:
    return join(out_url, PARTS_DIR, f"part-{part:05d}-of-{num_parts:05d}.json")


def _list_names(url: str, storage: StorageOptions | None) -> list[str]:
    """Base names of the files directly under ``url`` (none when it does not exist)."""
    fs, path = url_to_fs(url, storage)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)


def list_journals(out_url: str, storage: StorageOptions | None = None) -> dict[tuple[int, int], str]:
    """``{(part, num_parts): record URL}`` of every part record under ``out_url``."""
    found = {}
    for name in _list_names(join(out_url, PARTS_DIR), storage):
        m = _JOURNAL_NAME.fullmatch(name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = join(out_url, PARTS_DIR, name)
    return found


def read_journal(url: str, storage: StorageOptions | None = None) -> PartJournal | None:
    """The part record at ``url``, or ``None`` when there is none."""
    fs, path = url_to_fs(url, storage)
    try:
        data = retry_call(lambda: fs.cat_file(path), url=url, options=storage)
    except FileNotFoundError:
        return None
    return PartJournal.from_json(data.decode(), url)


def _write(url: str, text: str, storage: StorageOptions | None) -> None:
    retry_call(lambda: atomic_write(url, text.encode(), storage), url=url, options=storage)


def _remove(url: str, storage: StorageOptions | None) -> None:
    """Delete ``url`` if it exists (parts restarting at once may delete the same stale file)."""
    fs, path = url_to_fs(url, storage)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def _read_text(url: str, storage: StorageOptions | None) -> str | None:
    fs, path = url_to_fs(url, storage)
    try:
        return retry_call(lambda: fs.cat_file(path), url=url, options=storage).decode()
    except FileNotFoundError:
        return None


def merge_parts(
    out_url: str, storage: StorageOptions | None = None, num_parts: int | None = None, *, required: bool = True
) -> dict[str, Any] | None:
    """Merge the complete part records under ``out_url`` into ``manifest.json``; returns the manifest.

    ``num_parts``: the conversion to merge (default: the only one the folder holds). When a part is not
    complete yet this raises, or with ``required=False`` returns ``None`` (a part that finishes early
    asks this way; the last one merges). Idempotent: an identical ``manifest.json`` is not rewritten.
    """
    out_url = str(out_url).rstrip("/")
    num_parts = num_parts or _only_conversion(out_url, storage)
    journals = []
    for part in range(num_parts):  # in part order, stopping at the first one not finished
        journal = read_journal(_journal_url(out_url, part, num_parts), storage)
        if journal is None or not journal.complete:
            if not required:
                return None
            raise ValueError(_incomplete_message(out_url, num_parts, part, journal))
        journals.append(journal)
    _check_mergeable(out_url, journals)
    text = _manifest(journals).to_json()
    manifest_url = join(out_url, MANIFEST_NAME)
    if _read_text(manifest_url, storage) != text:
        _write(manifest_url, text, storage)  # the last write: readers never see half a manifest
        log.info("merged %d part(s) into %s", num_parts, manifest_url)
    return json.loads(text)


def _only_conversion(out_url: str, storage: StorageOptions | None) -> int:
    counts = sorted({n for _, n in list_journals(out_url, storage)})
    if not counts:
        raise FileNotFoundError(
            f"no part records under {join(out_url, PARTS_DIR)}: nothing to merge (convert with --part/--num-parts "
            "first; a single-part conversion writes manifest.json itself)"
        )
    if len(counts) > 1:
        raise ConversionMismatchError(
            f"{out_url} holds part records of conversions into {counts} parts; restart the parts with --restart "
            "(which deletes the other conversion's records) or write to another --out"
        )
    return counts[0]


def _incomplete_message(out_url: str, num_parts: int, part: int, journal: PartJournal | None) -> str:
    state = "has not started" if journal is None else f"is at id {journal.next_id} of {journal.num_ids}"
    return (
        f"cannot merge {out_url}: part {part} of {num_parts} {state}; run that part (the same command with "
        f"--part {part} --num-parts {num_parts}) and merge again (the last part to finish merges by itself)"
    )


def _check_mergeable(out_url: str, journals: list[PartJournal]) -> None:
    """Parts merge only when they share settings and tile the split's ids exactly."""
    first = journals[0]
    stop = 0
    for journal in journals:
        ours, theirs = first.fingerprint | first.header, journal.fingerprint | journal.header
        diffs = differences(ours, theirs, "in part 0", f"in part {journal.part}")
        if diffs:
            raise ConversionMismatchError(
                f"cannot merge {out_url}: part {journal.part} was converted with other settings than part 0: "
                f"{'; '.join(diffs)}; convert the odd part(s) again with the settings of the others and --restart"
            )
        held = sum(s.num_samples for s in journal.shards)
        if journal.ids["start"] != stop or held != journal.num_ids:
            raise ConversionMismatchError(
                f"cannot merge {out_url}: part {journal.part}'s record covers ids {journal.ids['start']}.."
                f"{journal.ids['stop']} with {held} samples in its shards; convert it again with --restart"
            )
        stop = journal.ids["stop"]
    if stop != first.fingerprint["num_ids"]:
        raise ConversionMismatchError(
            f"cannot merge {out_url}: the parts cover {stop} of {first.fingerprint['num_ids']} ids"
        )


def _manifest(journals: list[PartJournal]) -> Manifest:
    header = journals[0].header
    missing = {t: sum(j.labels_missing.get(t, 0) for j in journals) for t in header["optional_tasks"]}
    return Manifest(**header, shards=[s for j in journals for s in j.shards], labels_missing=missing)
