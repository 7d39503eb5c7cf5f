"""Where checkpoints live: a run directory's ``checkpoints/`` folder on local disk or S3, through fsspec.

A checkpoint counts once its marker exists and every file the marker lists is there with its listed
size (checksums are checked when files are read). The marker is one object written after all files,
so a save killed at any point, an upload included, leaves the previous complete checkpoint the newest.
``latest`` is a convenience for people; resuming never trusts it and scans newest first instead.

For ``s3://`` run directories :meth:`CheckpointStore.commit` only writes a local snapshot; an
:class:`Uploader` thread puts the files, then the marker, then ``latest`` and retires old checkpoints,
while training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from typing import Any

from mtlora_dist.checkpoint.format import (
    FORMAT,
    LATEST,
    MARKER,
    CheckpointError,
    ChecksumMismatchError,
    sha256_bytes,
    tag_step,
)
from mtlora_dist.storage.atomic import atomic_write
from mtlora_dist.storage.fs import StorageOptions, is_remote, join, url_to_fs

__all__ = ["CheckpointStore", "Uploader"]

log = logging.getLogger("mtlora_dist")


class CheckpointStore:
    """The ``checkpoints/`` folder of one run: list, verify, read, write, retire."""

    def __init__(self, root: str, storage: StorageOptions | None = None, keep_last: int = 3) -> None:
        self.root = root.rstrip("/")
        self.storage = storage
        self.keep_last = keep_last
        self.remote = is_remote(self.root)
        self.fs, self.path = url_to_fs(self.root, storage)

    def url(self, tag: str, name: str | None = None) -> str:
        return join(self.root, tag, name) if name else join(self.root, tag)

    # -- reading -----------------------------------------------------------------------------------
    def tags_newest_first(self) -> list[str]:
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        tags = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted((t for t in tags if tag_step(t) >= 0), key=tag_step, reverse=True)

    def marker(self, tag: str) -> dict[str, Any] | None:
        """The marker of ``tag`` if it is readable and every file it lists is there with its size."""
        try:
            marker = json.loads(self.fs.cat_file(f"{self.path}/{tag}/{MARKER}"))
        except (FileNotFoundError, ValueError):
            return None
        if marker.get("tag") != tag or not marker.get("files"):
            return None
        if marker.get("format") != FORMAT:
            raise CheckpointError(
                f"{self.url(tag)} was written in checkpoint format {marker.get('format')!r}; this version reads "
                f"{FORMAT!r}. Resume it with the mtlora-dist release that wrote it, or start a new run_dir"
            )
        sizes = self._sizes(tag)
        if any(sizes.get(name) != meta["size"] for name, meta in marker["files"].items()):
            return None
        return marker

    def newest_complete(self) -> tuple[str, dict[str, Any]] | None:
        for tag in self.tags_newest_first():
            marker = self.marker(tag)
            if marker is not None:
                return tag, marker
        return None

    def read(self, tag: str, name: str, marker: dict[str, Any]) -> bytes:
        """The bytes of one listed file, checked against the marker's sha256."""
        data = self.fs.cat_file(f"{self.path}/{tag}/{name}")
        expected = marker["files"][name]["sha256"]
        if sha256_bytes(data) != expected:
            raise ChecksumMismatchError(
                f"{self.url(tag, name)} differs from what its marker lists (sha256): the file changed after the "
                "checkpoint was completed; delete this checkpoint to resume from the one before"
            )
        return data

    def _sizes(self, tag: str) -> dict[str, int]:
        base = f"{self.path}/{tag}"
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        prefix = base.rstrip("/") + "/"
        return {p[len(prefix) :]: int(info["size"]) for p, info in found.items() if p.startswith(prefix)}

    # -- writing -----------------------------------------------------------------------------------
    def write_files(self, folder: str, files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
        """Write ``files`` into the local ``folder`` (atomically, each) and return their records."""
        records = {}
        for name, data in files.items():
            atomic_write(os.path.join(folder, name), data)
            records[name] = {"size": len(data), "sha256": sha256_bytes(data)}
        return records

    def publish(self, tag: str, staged: str, marker: dict[str, Any]) -> None:
        """Make a written checkpoint count: upload its files from ``staged`` (remote stores), then the
        marker, then ``latest``; then retire old ones."""
        if self.remote:
            for name in marker["files"]:
                self.fs.put_file(os.path.join(staged, name), f"{self.path}/{tag}/{name}")
        atomic_write(self.url(tag, MARKER), json.dumps(marker, indent=1, sort_keys=True).encode(), self.storage)
        atomic_write(join(self.root, LATEST), (tag + "\n").encode(), self.storage)
        if self.remote:
            shutil.rmtree(staged, ignore_errors=True)
        self.retire(keep=tag)

    def retire(self, keep: str) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints, and partial ones older than ``keep``."""
        if self.keep_last <= 0:
            return
        tags = self.tags_newest_first()
        complete = [t for t in tags if self.marker(t) is not None]
        survivors = set(complete[: self.keep_last]) | {keep}
        for tag in tags:
            if tag not in survivors and tag_step(tag) < tag_step(keep):
                self.delete(tag)

    def delete(self, tag: str) -> None:
        """Marker first, so a half-deleted checkpoint never looks complete. A local checkpoint folder that
        is a symbolic link, or resolves outside ``checkpoints/``, loses only its link: retention never
        deletes through a link what is not this run's."""
        base = f"{self.path}/{tag}"
        if not self.remote and _outside(base, self.path):
            log.warning("retiring %s: a link to %s, which is left alone", base, os.path.realpath(base))
            os.unlink(base)
            return
        self.fs.invalidate_cache()
        if self.fs.exists(f"{base}/{MARKER}"):
            self.fs.rm_file(f"{base}/{MARKER}")
        if self.remote:
            if self.fs.find(base):
                self.fs.rm(base, recursive=True)
        else:
            shutil.rmtree(base, ignore_errors=True)

    def abort_stale_uploads(self) -> None:
        """Abort unfinished multipart uploads under our prefix (left by a killed save). Called only while
        nothing uploads: at load time and before the first save."""
        if not self.remote or not hasattr(self.fs, "call_s3"):
            return
        bucket, _, key = self.path.partition("/")
        try:
            for upload in _multipart_uploads(self.fs, bucket, key.rstrip("/") + "/"):
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                log.info("aborted stale multipart upload of s3://%s/%s", bucket, upload["Key"])
        except Exception as err:  # noqa: BLE001 - a server without the call must not stop training
            if "NoSuchUpload" in str(err):  # rclone's answer when there are none: nothing to abort
                return
            log.warning("could not list/abort stale multipart uploads under %s: %s", self.root, err)


def _outside(path: str, root: str) -> bool:
    """True if ``path`` is a link or does not resolve to a place inside ``root``."""
    if os.path.islink(path):
        return True
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) != real_root


def _multipart_uploads(fs: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    uploads, kwargs = [], {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = fs.call_s3("list_multipart_uploads", **kwargs)
        uploads.extend(page.get("Uploads", []))
        if not page.get("IsTruncated"):
            return uploads
        kwargs.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))


class Uploader:
    """Publishes one checkpoint at a time on a background thread; ``wait`` joins it and re-raises."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.pending: str | None = None

    def start(self, tag: str, staged: str, marker: dict[str, Any]) -> None:
        self.wait()
        self.pending, self._error = tag, None
        self._thread = threading.Thread(target=self._run, args=(tag, staged, marker), name=f"upload-{tag}", daemon=True)
        self._thread.start()

    def _run(self, tag: str, staged: str, marker: dict[str, Any]) -> None:
        try:
            self.store.publish(tag, staged, marker)
            log.info("checkpoint %s uploaded", self.store.url(tag))
        except BaseException as err:  # noqa: BLE001 - reported by wait()
            self._error = err

    def wait_quietly(self) -> None:
        """``wait``, with a failed upload logged instead of raised (training goes on; the next save retries)."""
        try:
            self.wait()
        except CheckpointError as err:
            log.warning("%s", err)

    def wait(self) -> None:
        """Block until the pending upload is done; raise its error (the previous checkpoint stays newest)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        tag, error, self.pending, self._error = self.pending, self._error, None, None
        if error is not None:
            raise CheckpointError(
                f"uploading checkpoint {self.store.url(tag)} failed "
                f"({type(error).__name__}: {error}); the previous complete checkpoint stays "
                "the newest"
            ) from error
