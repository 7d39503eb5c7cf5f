"""Loading checkpoint files without running code from them.

A checkpoint read back from a shared bucket or folder is untrusted input: a ``torch.load`` with
``weights_only=False`` (what DeepSpeed 0.19's ``TorchCheckpointEngine`` does) unpickles whatever the file
holds, and a pickle can call any importable function while it loads. Every file of ours is therefore read
with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers, plus the three
data-only classes DeepSpeed writes into its ZeRO optimizer shards (allowed for the duration of one load,
never globally). A file that needs anything else is refused with :class:`UnsafeCheckpointError` before any
of its objects are built.

Each file is also checked against the sha256 the checkpoint's completion marker lists for it, so a file
that was changed or cut after the checkpoint was completed is refused too (:class:`ChecksumMismatchError`).

:class:`SafeTorchCheckpointEngine` puts both rules into DeepSpeed: DeepSpeed reads and writes every model
and optimizer file through ``engine.checkpoint_engine``, so installing it there covers
``engine.load_checkpoint``. It also writes each file atomically and records its size and checksum for the
marker.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

__all__ = [
    "ChecksumMismatchError",
    "FileRecord",
    "SafeTorchCheckpointEngine",
    "UnsafeCheckpointError",
    "check_plain_data",
    "deepspeed_safe_globals",
    "safe_torch_load",
    "sha256_file",
    "unsafe_globals",
]

_CHUNK = 8 * 1024 * 1024


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asked to build an object that weights-only loading does not allow."""


class ChecksumMismatchError(OSError):
    """A checkpoint file differs from what its completion marker recorded (or is not listed there)."""


@dataclass(frozen=True)
class FileRecord:
    """Size and sha256 of one written file, as the completion marker lists it."""

    size: int
    sha256: str


def deepspeed_safe_globals() -> list[Callable[..., Any]]:
    """The DeepSpeed classes its ZeRO-1/2 shards pickle: an int enum, a loss-scale holder and a
    ``(numel, start)`` dataclass. None of them runs code when rebuilt from their fields."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def sha256_file(path: str) -> str:
    """Hex sha256 of a local file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_torch_load(path: str, *, expected_sha256: str | None = None, map_location: Any = "cpu",
                    allow_deepspeed: bool = True) -> Any:
    """``torch.load`` a local file with ``weights_only=True``, verifying its sha256 first when given.

    The bytes are read once, hashed, and deserialized from memory, so the file that was checked is the
    file that is loaded. Raises :class:`ChecksumMismatchError` or :class:`UnsafeCheckpointError`.
    """
    with open(path, "rb") as f:
        data = f.read()
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ChecksumMismatchError(
                f"checkpoint file {path} has sha256 {actual}, but its completion marker lists {expected_sha256}: "
                "the file was changed or damaged after the checkpoint was written. Resume from another "
                "checkpoint (pass its tag) or delete this one.")
    allowed = deepspeed_safe_globals() if allow_deepspeed else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds objects that weights-only loading does not allow, so it may "
            f"run code when unpickled. Only tensors, plain Python data and {len(allowed)} DeepSpeed data "
            f"classes are accepted. Do not load this file unless you know where it came from.\n"
            f"torch said: {_first_line(err)}") from None


def unsafe_globals(path: str, *, allow_deepspeed: bool = True) -> list[str]:
    """Names of the classes/functions a torch zip file would need beyond what we allow, found by reading the
    pickle's opcodes without building anything. A quick pre-check so that every rank can refuse a bad
    checkpoint together; :func:`safe_torch_load` remains the guard (it also catches what a static scan
    cannot see)."""
    allowed = deepspeed_safe_globals() if allow_deepspeed else []
    try:
        with torch.serialization.safe_globals(allowed):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except ValueError as err:  # not a torch zip file
        return [f"<{err}>"]


def check_plain_data(state: Any, what: str = "client_state") -> None:
    """Raise ``TypeError`` unless ``state`` survives a save and a weights-only load (no DeepSpeed classes).

    Checked when saving so that a client state which could never be loaded back fails at once, not at
    the resume days later.
    """
    buffer = io.BytesIO()
    try:
        torch.save(state, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except (pickle.PicklingError, pickle.UnpicklingError, AttributeError, TypeError) as err:
        raise TypeError(
            f"{what} must hold only plain data (int, float, str, bool, None, list, tuple, dict, torch tensors) "
            f"so it can be loaded without unpickling code; {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    for line in text.splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(err).__name__


def _atomic_torch_save(state: Any, path: str) -> None:
    """Write to a temporary sibling, fsync, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed checkpoint engine that writes atomically and reads only weights-only, checksummed files.

    ``expected`` maps normalized local paths to the sha256 the marker lists; while it is set, reading a
    file that is not listed is refused. ``written`` collects every file saved since the last
    :meth:`reset_written`, so the checkpointer knows exactly which files this rank produced.
    """

    def __init__(self, config_params: Any = None) -> None:
        super().__init__(config_params)
        self.name = "SafeTorchCheckpointEngine"
        self.expected: dict[str, str] | None = None
        self.written: dict[str, FileRecord] = {}

    def reset_written(self) -> None:
        self.written = {}

    def save(self, state_dict: Any, path: str) -> None:
        _atomic_torch_save(state_dict, path)
        self.written[os.path.normpath(path)] = FileRecord(os.path.getsize(path), sha256_file(path))

    def save_plain(self, state: Any, path: str) -> None:
        """Save one of our own plain-data files (e.g. a rank's client state) the same way."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.save(state, path)

    def load(self, path: str, map_location: Any = None) -> Any:
        expected_sha = None
        if self.expected is not None:
            key = os.path.normpath(path)
            if key not in self.expected:
                raise ChecksumMismatchError(
                    f"DeepSpeed asked for {path}, which the checkpoint's completion marker does not list; "
                    "the checkpoint folder holds files it was not saved with.")
            expected_sha = self.expected[key]
        return safe_torch_load(path, expected_sha256=expected_sha, map_location=map_location)
