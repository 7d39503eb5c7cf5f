"""Atomic writes: a reader sees the old file or the whole new one, never a half-written file.

Local files: write a temporary file in the same folder, ``fsync`` it, ``os.replace`` it over the target
and ``fsync`` the folder, so the rename survives a power cut too (what timm's checkpoint saver and
torchtitan do). Object stores: one PUT, which S3 applies atomically. Everything in the package that
writes a file goes through :func:`atomic_write`. Files get the mode ``open()`` would give them (0666
less the umask): ``mkstemp`` alone makes them 0600, unreadable to a team sharing a run folder.
"""

from __future__ import annotations

import os
import tempfile

from mtlora_dist.storage.fs import StorageOptions, is_remote, url_to_fs

__all__ = ["atomic_write", "atomic_write_text"]

_UMASK = os.umask(0o022)  # read once: os.umask can only be read by setting it (process-wide)
os.umask(_UMASK)


def atomic_write(url: str, data: bytes, storage: StorageOptions | None = None) -> None:
    """Write ``data`` to ``url`` (a local path or ``s3://`` URL) atomically."""
    if is_remote(url):
        fs, path = url_to_fs(url, storage)
        fs.pipe_file(path, data)
        return
    path = os.path.abspath(url_to_fs(url)[1])
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def atomic_write_text(url: str, text: str, storage: StorageOptions | None = None) -> None:
    atomic_write(url, text.encode("utf-8"), storage)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
